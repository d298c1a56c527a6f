// The local scheduler (the stand-in for pg_cron + pg_net) against a stand-in
// endpoint: no database, only its timing and what it sends.
import assert from "node:assert/strict";
import { startScheduler } from "../../scripts/scheduler.ts";
import type { HttpSchedule } from "../../scripts/schedules.ts";

/** An endpoint answering `answers` in turn (the last one again after them), recording each call. */
function standIn(answers: unknown[]) {
  const calls: { at: number; auth: string | null }[] = [];
  const server = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen: () => {} }, (req) => {
    calls.push({ at: performance.now(), auth: req.headers.get("authorization") });
    return Response.json(answers[Math.min(calls.length, answers.length) - 1]);
  });
  return { url: `http://127.0.0.1:${server.addr.port}`, calls, server };
}

const maintenance = (moreAfterMs?: number): HttpSchedule => ({
  name: "maintain-partitions",
  cron: "15 0 * * *",
  everyMs: 3_600_000,
  path: "observability/maintenance",
  moreAfterMs,
});

const left = { remaining: [{ table_name: "public.x", partition_name: "x_2040_01", rows: 9 }] };
const drained = { remaining: [] };
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const noSql = () => Promise.reject(new Error("no SQL schedules here"));

Deno.test("the scheduler calls again soon while an answer lists work left, then waits", async () => {
  const api = standIn([left, left, drained]);
  const stop = startScheduler(api.url, "service-key", noSql, [maintenance(150)]);
  try {
    // the first call a second after the start, then two follow-ups 150 ms apart
    await sleep(2_200);
    assert.equal(api.calls.length, 3, "two follow-ups, then none once drained");
    for (let i = 1; i < 3; i++) {
      const gap = api.calls[i].at - api.calls[i - 1].at;
      assert.ok(gap >= 140 && gap < 900, `follow-up ${i} after ${gap} ms`);
    }
    assert.ok(api.calls.every((c) => c.auth === "Bearer service-key"));
  } finally {
    stop();
    await api.server.shutdown();
  }
});

Deno.test("without moreAfterMs, work left waits for the next interval", async () => {
  const api = standIn([left]);
  const stop = startScheduler(api.url, "service-key", noSql, [maintenance()]);
  try {
    await sleep(1_600);
    assert.equal(api.calls.length, 1);
  } finally {
    stop();
    await api.server.shutdown();
  }
});

Deno.test("a follow-up due after the scheduler stopped never runs", async () => {
  const api = standIn([left]);
  const stop = startScheduler(api.url, "service-key", noSql, [maintenance(300)]);
  try {
    // the first call and its follow-up; that one schedules another, due 300 ms later
    for (let i = 0; i < 100 && api.calls.length < 2; i++) await sleep(20);
    assert.equal(api.calls.length, 2);
    stop();
    await sleep(600);
    assert.equal(api.calls.length, 2);
  } finally {
    stop();
    await api.server.shutdown();
  }
});
