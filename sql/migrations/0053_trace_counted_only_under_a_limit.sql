-- A trace row enters the per-minute limits' index only when the organisation had a limit set at
-- notify time (issue 12: the fan-out's cost per recipient).
--
-- event_recipients_throttle (organisation_id, category_id, created_at) INCLUDE (user_id) WHERE
-- notified was one index entry per notified recipient, written by every fan-out, and read only
-- when the organisation sets throttle_per_minute or user_throttle_per_minute. counted_by_limits
-- is false for a row written while neither was set, and such rows stay out of the index; rows
-- from before this migration (NULL) count as they did. So a limit set now counts from now on:
-- what was sent in the minute before it was set is not counted (docs/decisions.md).
ALTER TABLE event_recipients ADD COLUMN counted_by_limits boolean;

CREATE INDEX event_recipients_limited ON event_recipients (organisation_id, category_id, created_at) INCLUDE (user_id)
    WHERE notified AND counted_by_limits IS NOT FALSE;
DROP INDEX event_recipients_throttle;
