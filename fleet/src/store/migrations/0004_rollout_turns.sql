-- A rollout's turn reads what changed and its current wave, not every
-- device: devices carry when their selector facts (labels, version, layout)
-- last changed, a rollout when it last looked for new members, a member
-- whether its task was created.
ALTER TABLE devices ADD COLUMN changed_at BIGINT;
UPDATE devices SET changed_at = registered_at;
CREATE INDEX devices_changed ON devices (changed_at);
ALTER TABLE rollouts ADD COLUMN scanned_at BIGINT;
ALTER TABLE rollout_devices ADD COLUMN started BIGINT NOT NULL DEFAULT 0;
UPDATE rollout_devices SET started = 1 WHERE EXISTS (
    SELECT 1 FROM tasks t
    WHERE t.rollout_id = rollout_devices.rollout_id AND t.device_id = rollout_devices.device_id);
CREATE INDEX rollout_devices_todo ON rollout_devices (rollout_id, started, wave, device_id);
CREATE INDEX rollout_devices_wave ON rollout_devices (rollout_id, wave, started, device_id);
CREATE INDEX tasks_device_rollout ON tasks (device_id, rollout_id);
