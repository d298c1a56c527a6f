// A message-queue consumer in its own process, for the test that kills one
// mid-batch. Arguments: database URL, queue, lease in seconds. It claims
// batches of 100 as the service role and acks them one message at a time. It
// prints a line once it holds its first batch (the test then starts the other
// consumers) and, halfway through its second batch, a JSON line of what it
// acked and what it still holds; then it waits there for the test to SIGKILL it.
import postgres from "postgres";

const [url, queue, lease] = Deno.args;
const sql = postgres(url, { max: 1, prepare: false, onnotice: () => {} });
await sql`set role service_role`;

const acked: string[] = [];
for (let batch = 1; batch <= 2; batch++) {
  // the lease runs from the claim's transaction, which starts after this
  const claimedAfter = Date.now();
  const rows = await sql`select id, lease_token
                         from public.claim_messages(${queue}, 100, ${Number(lease)}, 'killed')`;
  if (batch === 1) console.log("claimed");
  const keep = batch === 2 ? Math.floor(rows.length / 2) : rows.length;
  for (const r of rows.slice(0, keep)) {
    await sql`select from public.ack_messages(${queue}, ${[r.id]}::bigint[],
                                              ${[r.lease_token]}::uuid[])`;
    acked.push(String(r.id));
  }
  if (batch === 2) {
    const held = rows.slice(keep).map((r) => String(r.id));
    console.log(JSON.stringify({ acked, held, claimedAfter }));
  }
}
await new Promise(() => {}); // mid-batch, until killed
