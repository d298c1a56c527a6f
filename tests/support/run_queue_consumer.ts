// A message-queue consumer in its own process, for the test that kills one
// mid-batch. Arguments: database URL, queue, lease in seconds. As the service
// role it claims two batches of 100 (the first with a 30 s lease, the second
// with the given one) before it prints "claimed" (the test then starts the
// other consumers, so it never races them for messages). It acks the first
// batch and half the second one message at a time, prints a JSON line of what
// it acked and what it still holds, and waits there for the test to SIGKILL it.
import postgres from "postgres";

const [url, queue, lease] = Deno.args;
const sql = postgres(url, { max: 1, prepare: false, onnotice: () => {} });
await sql`set role service_role`;

const claim = (seconds: number) =>
  sql`select id, lease_token from public.claim_messages(${queue}, 100, ${seconds}, 'killed')`;
const first = await claim(30);
// the second lease runs from the claim's transaction, which starts after this
const claimedAfter = Date.now();
const second = await claim(Number(lease));
console.log("claimed");

const acked: string[] = [];
const keep = Math.floor(second.length / 2);
for (const r of [...first, ...second.slice(0, keep)]) {
  const done = await sql`select id from public.ack_messages(${queue}, ${[r.id]}::bigint[],
                                                            ${[r.lease_token]}::uuid[])`;
  if (done.length !== 1) throw new Error(`ack of ${r.id} lost its lease`);
  acked.push(String(r.id));
}
const held = second.slice(keep).map((r) => String(r.id));
console.log(JSON.stringify({ acked, held, claimedAfter }));
await new Promise(() => {}); // mid-batch, until killed
