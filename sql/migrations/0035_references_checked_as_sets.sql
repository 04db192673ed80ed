-- A statement's references are looked up and locked as one set, not one index probe per
-- distinct reference (issue 12: notify to 100 000 members).
--
-- 0029's check_references joined each distinct reference of the statement's rows to its table
-- LATERALly: an index probe and a row lock per reference, in a nested loop. For the event of a
-- fan-out that is one probe; for its users one per recipient, three times per chunk (its in-app
-- rows, deliveries and trace rows). The planner cannot do better from a transition table: it has
-- no statistics, and the referenced table's row-level security makes it guess that 0.5 % of the
-- rows are the organisation's.
--
-- Every statement Herald makes names one organisation, so the check now gathers the statement's
-- distinct references into an array and asks for `organisation_id = $1 AND id = ANY ($2)`,
-- which the planner costs from the array's length: a few index probes for a few references, a
-- scan with a hashed lookup for a whole chunk of users. Rows naming more than one organisation
-- (or none) keep 0029's form.
--
-- What it checks is unchanged: every distinct (organisation_id, reference) of the statement
-- exists and is locked FOR KEY SHARE, so a concurrent delete of it waits for the inserting
-- transaction (a row deleted under it is not returned by the lock, and the counts differ); a
-- missing one is the same error as before (SQLSTATE 23503 under the old key's name), naming the
-- first missing reference, looked up only when the counts differ.
CREATE OR REPLACE FUNCTION check_references() RETURNS trigger
    LANGUAGE plpgsql
    SET search_path = pg_catalog, public
AS $$
DECLARE
    org uuid;
    one_org boolean;
    refs uuid[];
    found bigint;
    missing uuid[];
BEGIN
    EXECUTE 'SELECT organisation_id FROM added LIMIT 1' INTO org;
    EXECUTE format('SELECT bool_and(organisation_id = $1), array_agg(DISTINCT %1$I) FROM added', TG_ARGV[1])
    INTO one_org, refs USING org;
    IF one_org THEN
        EXECUTE format('SELECT count(*) FROM (SELECT 1 FROM public.%1$I r WHERE r.organisation_id = $1 AND r.id = ANY ($2)
                                              FOR KEY SHARE) l', TG_ARGV[0])
        INTO found USING org, refs;
        IF found = cardinality(refs) THEN
            RETURN NULL;
        END IF;
    END IF;
    EXECUTE format(
        'SELECT ARRAY[a.organisation_id, a.ref] FROM (SELECT DISTINCT organisation_id, %1$I AS ref FROM added) a
         LEFT JOIN LATERAL (SELECT true AS present FROM public.%2$I r WHERE r.organisation_id = a.organisation_id AND r.id = a.ref
                            FOR KEY SHARE) r ON true
         WHERE r.present IS NULL LIMIT 1', TG_ARGV[1], TG_ARGV[0])
    INTO missing;
    IF missing IS NOT NULL OR one_org THEN
        PERFORM raise_reference_missing(TG_TABLE_NAME, TG_ARGV[0], TG_ARGV[1], missing[1], missing[2]);
    END IF;
    RETURN NULL;
END
$$;
