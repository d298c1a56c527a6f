// Message queue: send, and claim + ack, with batch sizes 1 and 100, at the
// same concurrency in the same database and run, ours against pg-boss used as
// a queue (send / insert, fetch with batchSize + complete). Messages per
// second, best of ROUNDS rounds.
import { closeAll, connections, drain, report, spread, startPgBoss } from "./lib.ts";

const WORKERS = Number(Deno.env.get("BENCH_CONCURRENCY") ?? 4);
const ROUNDS = Number(Deno.env.get("BENCH_ROUNDS") ?? 2);
const SIZES = [1, 100];
const messagesFor = (batch: number) => batch === 1 ? 2000 : 20000;

type Rates = { send: number; consume: number };

async function ours(batch: number, round: number): Promise<Rates> {
  const sqls = await connections(WORKERS);
  const queue = `bench_${batch}_${round}`;
  const total = messagesFor(batch);
  try {
    const sent = await spread(WORKERS, total / batch, async (w, i) => {
      const sql = sqls[w];
      if (batch === 1) {
        await sql`select 1 from public.send_message(${queue}, ${sql.json({ i })})`;
      } else {
        const messages = Array.from({ length: batch }, (_, j) => ({ payload: { i, j } }));
        await sql`select count(*) from public.send_messages(${queue}, ${sql.json(messages)})`;
      }
    });
    const consumed = await drain(WORKERS, async (w) => {
      const sql = sqls[w];
      const rows =
        await sql`select id, lease_token from public.claim_messages(${queue}, ${batch}, 30)`;
      if (rows.length === 0) return 0;
      if (batch === 1) {
        await sql`select 1 from public.ack_message(${queue}, ${rows[0].id}::bigint, ${
          rows[0].lease_token
        }::uuid)`;
      } else {
        await sql`select count(*) from public.ack_messages(${queue},
                    ${rows.map((r) => r.id)}::bigint[], ${rows.map((r) => r.lease_token)}::uuid[])`;
      }
      return rows.length;
    });
    return { send: total / sent, consume: total / consumed };
  } finally {
    await closeAll(sqls);
  }
}

async function pgBoss(batch: number, round: number): Promise<Rates> {
  const boss = await startPgBoss(WORKERS);
  const queue = `bench_${batch}_${round}`;
  const total = messagesFor(batch);
  await boss.createQueue(queue);
  try {
    const sent = await spread(WORKERS, total / batch, async (_, i) => {
      if (batch === 1) await boss.send(queue, { i });
      else {await boss.insert(
          Array.from({ length: batch }, (_, j) => ({ name: queue, data: { i, j } })),
        );}
    });
    const consumed = await drain(WORKERS, async () => {
      const jobs = await boss.fetch(queue, { batchSize: batch });
      if (jobs.length === 0) return 0;
      await boss.complete(queue, jobs.map((j) => j.id));
      return jobs.length;
    });
    return { send: total / sent, consume: total / consumed };
  } finally {
    await boss.stop({ graceful: false, wait: true });
  }
}

console.log(`queue: ${WORKERS} workers, best of ${ROUNDS} rounds`);
for (const batch of SIZES) {
  const best = { ours: { send: 0, consume: 0 }, peer: { send: 0, consume: 0 } };
  for (let r = 0; r < ROUNDS; r++) {
    const o = await ours(batch, r);
    const p = await pgBoss(batch, r);
    best.ours = {
      send: Math.max(best.ours.send, o.send),
      consume: Math.max(best.ours.consume, o.consume),
    };
    best.peer = {
      send: Math.max(best.peer.send, p.send),
      consume: Math.max(best.peer.consume, p.consume),
    };
  }
  report(`send, batch ${batch}`, "msg/s", best.ours.send, "pg-boss", best.peer.send);
  report(`claim+ack, batch ${batch}`, "msg/s", best.ours.consume, "pg-boss", best.peer.consume);
}
