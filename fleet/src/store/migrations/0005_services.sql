-- The services each device should run: the body of its last installService
-- that succeeded, by the namespace the agent reports (the lowercased service
-- code); removed by a successful uninstallService. After an upgrade they are
-- sent again, and the task's `services` column follows that re-install.
CREATE TABLE device_services (
    device_id TEXT NOT NULL,
    code TEXT NOT NULL,
    version TEXT NOT NULL,
    body TEXT NOT NULL,
    recorded_at BIGINT NOT NULL,
    PRIMARY KEY (device_id, code)
);
ALTER TABLE tasks ADD COLUMN services TEXT;
