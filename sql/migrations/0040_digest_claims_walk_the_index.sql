-- Issue 12 (digests' cost per run): the claim of due digest runs read every due run.
--
-- claim_digest_runs (0012) takes the due runs in time order through digest_runs_claim, LIMIT the
-- claim. auto_explain during the bench's digest run (10 000 runs due at once) showed the same plan
-- 0020 and 0038 removed from the delivery claims: a bitmap scan of every due run (10 000 rows read)
-- and a sort, to lease 8; 14.5 ms a claim. An index scan in order stops at the claim's last row.
ALTER FUNCTION claim_digest_runs(text, integer, integer, timestamptz, uuid, boolean) SET enable_bitmapscan = off;
