// Dispatch throughput against the fake Cloud API answering after 50 ms.
//
//   1. limit 1,000 msg/s, three concurrent dispatchers: sustained messages/s (target >= 1,000)
//   2. limit 80 msg/s, three concurrent dispatchers: sustained messages/s
//      (target within 5% of 80, never above) and the busiest 1-second window
//
// Peer: a bare in-memory paced sender posting the same requests to the same
// fake at the same limit and concurrency, with no queue and no database: the
// ceiling the queue's bookkeeping is measured against. Ratio = ours / peer.
import postgres from "postgres";
import { closeDb } from "../shared/db.ts";
import { resetEnv } from "../shared/env.ts";
import { dispatch, sendMessage } from "../shared/whatsapp_dispatch.ts";
import { resetWhatsappConfig, whatsappConfig } from "../shared/whatsapp.ts";
import { BENCH_DB, BENCH_SECRET } from "./lib.ts";

const LATENCY_MS = 50;

// The fake runs in its own process: its arrival clock is the measurement, and
// it must not share an event loop with the dispatchers it measures.
const fakeProcess = new Deno.Command(Deno.execPath(), {
  args: [
    "run",
    "-A",
    new URL("../tests/support/fake_whatsapp_server.ts", import.meta.url).pathname,
  ],
  env: { FAKE_LATENCY_MS: String(LATENCY_MS) },
  stdout: "piped",
  stderr: "inherit",
}).spawn();
const firstLine = await (async () => {
  const reader = fakeProcess.stdout.pipeThrough(new TextDecoderStream()).getReader();
  let text = "";
  while (!text.includes("\n")) {
    const { value, done } = await reader.read();
    if (done) break;
    text += value;
  }
  reader.releaseLock();
  return text.split("\n")[0];
})();
const fake: { url: string; token: string; phone_number_id: string } = JSON.parse(firstLine);
const fakeControl = async (path: string, body?: unknown) => {
  const res = await fetch(`${fake.url}/__fake/${path}`, {
    method: body === undefined && path === "requests" ? "GET" : "POST",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  return await res.json();
};
async function acceptedArrivals(): Promise<number[]> {
  const requests: { at: number; outcome: string }[] = await fakeControl("requests");
  return requests.filter((r) => r.outcome.startsWith("wamid.")).map((r) => r.at);
}

function configure(rate: number, concurrency: number) {
  const vars: Record<string, string> = {
    SUPABASE_DB_URL: BENCH_DB,
    JWT_SECRET: BENCH_SECRET,
    LOG_LEVEL: "silent",
    DB_POOL_SIZE: "8",
    WHATSAPP_ACCESS_TOKEN: fake.token,
    WHATSAPP_PHONE_NUMBER_ID: fake.phone_number_id,
    WHATSAPP_API_BASE_URL: fake.url,
    WHATSAPP_RATE_LIMIT_PER_SECOND: String(rate),
    WHATSAPP_DISPATCH_CONCURRENCY: String(concurrency),
    WHATSAPP_LOOKAHEAD_MS: "250",
    WHATSAPP_DISPATCH_BUDGET_MS: "60000",
  };
  for (const [k, v] of Object.entries(vars)) Deno.env.set(k, v);
  resetEnv();
  resetWhatsappConfig();
}

const sql = postgres(BENCH_DB, { max: 2, onnotice: () => {} });

/** n messages to n distinct users whose 24-hour window is open. */
async function seed(n: number, tag: string) {
  await sql`
    with phones as (
      select '+2507' || lpad((g + ${
    tag.length * 10_000_000
  })::text, 8, '0') as phone, g from generate_series(1, ${n}) g
    ), sessions as (
      insert into public.whatsapp_sessions (phone_number, last_inbound_at)
      select phone, now() from phones
      on conflict (phone_number) do update set last_inbound_at = now()
    )
    insert into public.whatsapp_message_queue (recipient_phone, message_type, message_payload)
    select phone, 'text', jsonb_build_object('body', ${tag} || ' #' || g, 'preview_url', false) from phones`;
  // the steady state of a live queue: autovacuum has analysed it
  await sql`analyze public.whatsapp_message_queue, public.whatsapp_sessions`;
}

function rates(arrivals: number[], rate: number) {
  const t = [...arrivals].sort((a, b) => a - b);
  // sustained: the middle 80% of the run, away from ramp-up and drain, as the
  // least-squares slope of arrivals over time (two end points alone would let
  // a few ms of jitter at either end move the figure)
  const lo = Math.floor(t.length * 0.1);
  const hi = Math.ceil(t.length * 0.9) - 1;
  const n = hi - lo + 1;
  let meanT = 0;
  for (let i = lo; i <= hi; i++) meanT += t[i] / n;
  const meanI = (lo + hi) / 2;
  let cov = 0;
  let varT = 0;
  for (let i = lo; i <= hi; i++) {
    cov += (t[i] - meanT) * (i - meanI);
    varT += (t[i] - meanT) ** 2;
  }
  const sustained = (cov / varT) * 1000;
  let busiest = 0;
  for (let i = 0, j = 0; i < t.length; i++) {
    while (t[i] - t[j] >= 1000) j++;
    busiest = Math.max(busiest, i - j + 1);
  }
  return { sustained, busiest, limit: rate };
}

async function ours(rate: number, dispatchers: number, n: number, concurrency: number) {
  configure(rate, concurrency);
  await seed(n, `r${rate}`);
  await fakeControl("reset");
  await fakeControl("latency", { ms: LATENCY_MS });
  const started = performance.now();
  const reports = await Promise.all(
    Array.from({ length: dispatchers }, (_, i) => dispatch({ dispatcherId: `bench-${rate}-${i}` })),
  );
  const seconds = (performance.now() - started) / 1000;
  const sent = reports.reduce((s, r) => s + r.sent, 0);
  const [{ left }] = await sql`select count(*)::int as left from public.whatsapp_message_queue
                               where status in ('pending', 'processing')`;
  if (sent !== n || left !== 0) throw new Error(`sent ${sent} of ${n}; ${left} left in the queue`);
  return { ...rates(await acceptedArrivals(), rate), seconds };
}

/** The peer: paced in memory, same fake, same request bodies, no database. */
async function peer(rate: number, n: number, concurrency: number) {
  configure(rate, concurrency);
  const cfg = whatsappConfig();
  await fakeControl("reset");
  await fakeControl("latency", { ms: LATENCY_MS });
  const interval = 1000 / rate;
  const start = performance.now() + 20;
  let next = 0;
  const started = performance.now();
  const worker = async () => {
    while (next < n) {
      const i = next++;
      const wait = start + i * interval - performance.now();
      if (wait > 0) await new Promise((r) => setTimeout(r, wait));
      const m = {
        id: i + 1,
        lease_token: crypto.randomUUID(),
        recipient_phone: `+2507${String(90_000_000 + i).padStart(8, "0")}`,
        message_type: "text" as const,
        message_payload: { body: `peer #${i}`, preview_url: false },
        attempts: 1,
        max_attempts: 5,
        correlation_id: null,
        slot_ms: 0,
      };
      await sendMessage(cfg, m);
    }
  };
  await Promise.all(Array.from({ length: concurrency }, worker));
  const seconds = (performance.now() - started) / 1000;
  return { ...rates(await acceptedArrivals(), rate), seconds };
}

const fmt = (x: number) => x.toFixed(1);
const scenarios = [
  { name: "limit 1000/s, 3 dispatchers", rate: 1000, dispatchers: 3, n: 15_000, concurrency: 1000 },
  { name: "limit 80/s, 3 dispatchers", rate: 80, dispatchers: 3, n: 1_200, concurrency: 100 },
];
for (const s of scenarios) {
  const o = await ours(s.rate, s.dispatchers, s.n, s.concurrency);
  const p = await peer(s.rate, s.n, s.concurrency);
  console.log(
    `whatsapp dispatch, ${s.name}, ${s.n} messages, fake latency ${LATENCY_MS} ms:\n` +
      `  ours: ${fmt(o.sustained)} msg/s sustained (busiest 1 s window: ${o.busiest}, run ${
        fmt(o.seconds)
      } s)\n` +
      `  peer: ${fmt(p.sustained)} msg/s sustained (busiest 1 s window: ${p.busiest}, run ${
        fmt(p.seconds)
      } s)` +
      ` [in-memory paced sender, no queue]\n` +
      `  ratio ours/peer: ${(o.sustained / p.sustained).toFixed(3)}; ours vs limit: ${
        (100 * (o.sustained / s.rate - 1)).toFixed(2)
      }%`,
  );
}

await sql.end();
await closeDb();
fakeProcess.kill("SIGTERM");
await fakeProcess.status;
