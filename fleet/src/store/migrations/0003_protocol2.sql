-- Agent protocol 2: the boot id each heartbeat reports (a task's start boot
-- is the device's boot when it was sent, not its last confirmed one), the
-- agent's protocol version, and a cancel sent to the device and not answered
-- yet ('abort': the task ends canceled; 'hold': a frozen rollout, the task
-- goes back to pending).
ALTER TABLE devices ADD COLUMN current_boot_id TEXT;
ALTER TABLE devices ADD COLUMN protocol BIGINT;
ALTER TABLE tasks ADD COLUMN cancel TEXT;
