-- One schema for SQLite and PostgreSQL: only BIGINT and TEXT columns, JSON
-- kept as TEXT, ids made by the application (counters), so every query runs
-- unchanged on both.

CREATE TABLE counters (name TEXT PRIMARY KEY, value BIGINT NOT NULL);
INSERT INTO counters (name, value) VALUES ('outbox', 0);
INSERT INTO counters (name, value) VALUES ('device', 0);
INSERT INTO counters (name, value) VALUES ('heartbeat', 0);
INSERT INTO counters (name, value) VALUES ('event', 0);

CREATE TABLE devices (
    id TEXT PRIMARY KEY,
    token TEXT NOT NULL, -- sha256 of the device token
    token_expires_at BIGINT NOT NULL,
    registered_at BIGINT NOT NULL,
    hardware TEXT NOT NULL,
    labels TEXT NOT NULL,
    model TEXT,
    layout TEXT NOT NULL,
    version TEXT,
    agent_version TEXT,
    slot TEXT,
    slot_primary TEXT,
    slot_fallback BIGINT,
    slot_good BIGINT,
    boot_id TEXT,
    boot_version TEXT,
    boot_at BIGINT,
    services TEXT NOT NULL,
    last_seen BIGINT,
    outages BIGINT NOT NULL,
    failures BIGINT NOT NULL,
    hb_sent_at BIGINT,
    -- the agent's `at` of the newest heartbeat applied: an older one that
    -- arrives later (reordered, republished) does not roll the facts back
    hb_at BIGINT
);

CREATE INDEX devices_token ON devices (token);

CREATE TABLE tasks (
    id TEXT PRIMARY KEY,
    wire_id TEXT NOT NULL UNIQUE,
    device_id TEXT NOT NULL,
    task_type TEXT NOT NULL,
    generation BIGINT NOT NULL,
    attempt BIGINT NOT NULL,
    rollout_id TEXT,
    body TEXT NOT NULL,
    target_version TEXT,
    from_version TEXT,
    start_boot_id TEXT,
    state TEXT NOT NULL,
    active BIGINT NOT NULL,
    acked BIGINT NOT NULL,
    device_done BIGINT NOT NULL,
    published_at BIGINT,
    phase_since BIGINT NOT NULL,
    deadline BIGINT,
    not_before BIGINT,
    resends BIGINT NOT NULL,
    error TEXT,
    result TEXT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    UNIQUE (device_id, task_type, generation)
);
-- One active task per device and type, enforced by the database itself.
CREATE UNIQUE INDEX tasks_one_active ON tasks (device_id, task_type) WHERE active = 1;
CREATE INDEX tasks_rollout ON tasks (rollout_id, state);
CREATE INDEX tasks_deadline ON tasks (active, deadline);

CREATE TABLE task_events (
    id BIGINT PRIMARY KEY,
    task_id TEXT NOT NULL,
    at BIGINT NOT NULL,
    from_state TEXT NOT NULL,
    to_state TEXT NOT NULL,
    reason TEXT NOT NULL
);
CREATE INDEX task_events_task ON task_events (task_id);

-- Results by ackKey: a repeat (same key) is acked again but never applied twice.
CREATE TABLE results_seen (
    ack_key TEXT NOT NULL,
    device_id TEXT NOT NULL,
    status TEXT NOT NULL,
    received_at BIGINT NOT NULL,
    PRIMARY KEY (device_id, ack_key)
);
CREATE INDEX results_seen_age ON results_seen (received_at);

-- Every message to a device leaves through here, written in the same
-- transaction as the state change it carries.
CREATE TABLE outbox (
    id BIGINT PRIMARY KEY,
    topic TEXT NOT NULL,
    payload TEXT NOT NULL,
    task_id TEXT,
    created_at BIGINT NOT NULL,
    claimed_at BIGINT,
    sent_at BIGINT
);
CREATE INDEX outbox_unsent ON outbox (sent_at, id);

CREATE TABLE rollouts (
    id TEXT PRIMARY KEY,
    spec TEXT NOT NULL,
    state TEXT NOT NULL,
    wave BIGINT NOT NULL,
    wave_started_at BIGINT,
    gate_met_since BIGINT,
    reason TEXT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

CREATE TABLE rollout_devices (
    rollout_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    wave BIGINT NOT NULL,
    joined_at BIGINT NOT NULL,
    PRIMARY KEY (rollout_id, device_id)
);
