-- Several controllers on one PostgreSQL: one holds the "ticker" lease and
-- runs deadlines, rollouts and heartbeat tasks; every one takes MQTT and
-- HTTP traffic. The lease row is taken at the start of each tick
-- transaction, so a controller that lost it (paused past its expiry)
-- finds out before it writes anything.
CREATE TABLE leases (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    until_ms BIGINT NOT NULL
);
