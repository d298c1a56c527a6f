-- =============================================================================
-- WhatsApp claims stay on indexes while the pacing table is young.
--
-- Every send adds a row to private.whatsapp_pair_pacing. In a burst right
-- after a quiet period its statistics still say "empty", so the claim planned
-- the pacing anti-join as one sequential scan materialised and compared with
-- every pending head: each claim then read the whole pacing table once per
-- candidate message, and claims went from a few milliseconds to over a hundred
-- as a 15,000-message burst went out, leaving the dispatcher's send slots
-- unfilled. With sequential scans off for this one function the lookup is a
-- primary-key probe per candidate, whatever the statistics say. (Every table
-- the claim reads has the index it needs; the planner still falls back to a
-- sequential scan where no index exists.)
-- =============================================================================
alter function public.claim_whatsapp_messages(text, text, integer, integer, integer, integer, integer)
  set enable_seqscan = off;
