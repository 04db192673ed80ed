-- A user's quiet hours: a daily window of their local time (their time zone, else the
-- organisation's) in which Herald sends them no email unless it is critical. Stored as minutes
-- after local midnight; both or neither; a window of no length is refused. The engine holds an
-- email that falls inside the window until the window ends (reason HELD_QUIET_HOURS): its
-- delivery is written due then. In-app rows are not held; nor is anything of a critical category
-- or a critical event.
ALTER TABLE users
    ADD COLUMN quiet_hours_start smallint,
    ADD COLUMN quiet_hours_end smallint,
    ADD CONSTRAINT users_quiet_hours_valid CHECK (
        (quiet_hours_start IS NULL AND quiet_hours_end IS NULL)
        OR (quiet_hours_start BETWEEN 0 AND 1439 AND quiet_hours_end BETWEEN 0 AND 1439 AND quiet_hours_start <> quiet_hours_end));
