-- A delivery whose event is cancelled while a worker holds it ends CANCELLED, like the rows the
-- cancel reached first (a trial: the cancel set the event's PENDING and FAILED rows CANCELLED,
-- while a row claimed a moment before ended DEAD with "Not sent: the event was cancelled.",
-- which read as a failure to alert on). complete_deliveries writes the status the worker sends;
-- the attempt log takes it as the attempt's outcome, so the log needs the word too.
ALTER TABLE delivery_attempts DROP CONSTRAINT delivery_attempts_outcome_valid;
ALTER TABLE delivery_attempts ADD CONSTRAINT delivery_attempts_outcome_valid
    CHECK (outcome IN ('SENT', 'FAILED', 'DEAD', 'CANCELLED', 'FENCED', 'EXPIRED'));
