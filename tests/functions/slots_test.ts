// shared/slots.ts: at most `limit` operations at once, first come first
// served; a wait past the bound is refused before the operation starts and
// gives up its place; a failed operation frees its slot.
import assert from "node:assert/strict";
import { Slots } from "../../shared/slots.ts";

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const refused = (waitedMs: number) => Object.assign(new Error("refused"), { waitedMs });

Deno.test("at most `limit` run at once, and they start in the order they came", async () => {
  const slots = new Slots();
  let running = 0;
  let most = 0;
  const burst = async () => {
    const started: number[] = [];
    await Promise.all(Array.from({ length: 12 }, (_, i) =>
      slots.run(3, 5_000, async () => {
        started.push(i);
        most = Math.max(most, ++running);
        await sleep(5 + (i % 4) * 3);
        running--;
      }, refused)));
    assert.deepEqual(started, Array.from({ length: 12 }, (_, i) => i));
  };
  // a second burst: slots handed from one operation to the next are counted right
  await burst();
  await burst();
  assert.equal(most, 3);
  assert.equal(slots.waiting, 0);
});

Deno.test("a wait past the bound is refused, never runs, and leaves the slot to the next", async () => {
  const slots = new Slots();
  const ran: string[] = [];
  const holder = slots.run(1, 1_000, async () => {
    ran.push("holder");
    await sleep(300);
  }, refused);
  // settled as it happens: the refusal comes while the test sleeps
  const late = slots.run(1, 100, () => {
    ran.push("late");
    return Promise.resolve();
  }, refused).then(() => null, (e: Error & { waitedMs: number }) => e);
  await sleep(150); // "late" has been refused by now; this one queues behind the holder
  const next = slots.run(1, 2_000, () => {
    ran.push("next");
    return Promise.resolve();
  }, refused);
  const refusal = await late;
  assert.equal(refusal?.message, "refused");
  assert.ok(refusal.waitedMs >= 99, `waited ${refusal.waitedMs} ms`);
  assert.ok(refusal.waitedMs < 250, "refused while the holder still ran");
  await holder;
  await next;
  assert.deepEqual(ran, ["holder", "next"]);
  assert.equal(slots.waiting, 0);
});

Deno.test("an operation that fails frees its slot", async () => {
  const slots = new Slots();
  await assert.rejects(slots.run(1, 100, () => Promise.reject(new Error("boom")), refused), {
    message: "boom",
  });
  assert.equal(await slots.run(1, 100, () => Promise.resolve("after"), refused), "after");
});

Deno.test("a refusal that throws still refuses the waiter and gives up its place", async () => {
  const slots = new Slots();
  let release!: () => void;
  const holder = slots.run(1, 1_000, () => new Promise<void>((r) => release = r), refused);
  const late = slots.run(1, 50, () => Promise.resolve("ran"), () => {
    throw new Error("the refusal itself failed");
  });
  await assert.rejects(late, { message: "the refusal itself failed" });
  assert.equal(slots.waiting, 0);
  release();
  await holder;
  assert.equal(await slots.run(1, 100, () => Promise.resolve("after"), refused), "after");
});
