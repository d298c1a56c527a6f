// shared/coalesce.ts: writes that arrive together share a batch, each caller
// gets its own result, and a failed batch falls back to one write per caller.
import assert from "node:assert/strict";
import { coalescer } from "../../shared/coalesce.ts";

/** A fake backend that records the batches it is handed and answers later. */
function backend(failWhen: (item: number) => boolean = () => false) {
  const batches: number[][] = [];
  const singles: number[] = [];
  let running = 0;
  let maxRunning = 0;
  const tick = () => new Promise((r) => setTimeout(r, 5));
  const many = async (_group: string, items: number[]) => {
    batches.push(items);
    maxRunning = Math.max(maxRunning, ++running);
    await tick();
    running--;
    if (items.some(failWhen)) throw new Error("batch failed");
    return items.map((i) => i * 10);
  };
  const one = async (_group: string, item: number) => {
    singles.push(item);
    maxRunning = Math.max(maxRunning, ++running);
    await tick();
    running--;
    if (failWhen(item)) throw new Error(`item ${item} failed`);
    return item * 10;
  };
  return { batches, singles, many, one, maxRunning: () => maxRunning };
}

Deno.test("concurrent writes share batches, in order, within the in-flight limit", async () => {
  const b = backend();
  const submit = coalescer(b.many, b.one, { maxBatch: 8, maxInFlight: 2 });
  const results = await Promise.all(Array.from({ length: 30 }, (_, i) => submit("g", i)));
  assert.deepEqual(results, Array.from({ length: 30 }, (_, i) => i * 10));
  // The first two go alone; the rest queue behind them and leave in batches of at most 8.
  assert.deepEqual(b.singles, [0, 1]);
  assert.deepEqual(b.batches.flat(), Array.from({ length: 28 }, (_, i) => i + 2));
  assert.ok(b.batches.every((batch) => batch.length > 1 && batch.length <= 8));
  assert.ok(b.maxRunning() <= 2, `ran ${b.maxRunning()} at once`);
});

Deno.test("a failed batch is retried one by one so only the bad write fails", async () => {
  const b = backend((i) => i === 7);
  const submit = coalescer(b.many, b.one, { maxBatch: 100, maxInFlight: 1 });
  const settled = await Promise.allSettled(Array.from({ length: 12 }, (_, i) => submit("g", i)));
  settled.forEach((s, i) => {
    if (i === 7) {
      assert.equal(s.status, "rejected");
      assert.match(String((s as PromiseRejectedResult).reason), /item 7 failed/);
    } else {
      assert.deepEqual(s, { status: "fulfilled", value: i * 10 });
    }
  });
  // Item 0 went alone; 1..11 failed as a batch, then each went on its own.
  assert.deepEqual(b.batches, [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]);
  assert.deepEqual(b.singles, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]);
});

Deno.test("groups never share a batch", async () => {
  const seen: Array<[string, number[]]> = [];
  const submit = coalescer<string, number, string>(
    async (group, items) => {
      seen.push([group, items]);
      await new Promise((r) => setTimeout(r, 5));
      return items.map((i) => `${group}${i}`);
    },
    async (group, item) => {
      seen.push([group, [item]]);
      await new Promise((r) => setTimeout(r, 5));
      return `${group}${item}`;
    },
    { maxBatch: 50, maxInFlight: 1 },
  );
  const results = await Promise.all(
    Array.from({ length: 20 }, (_, i) => submit(i % 2 ? "b" : "a", i)),
  );
  assert.deepEqual(results, Array.from({ length: 20 }, (_, i) => `${i % 2 ? "b" : "a"}${i}`));
  for (const [group, items] of seen) {
    assert.ok(items.every((i) => (i % 2 ? "b" : "a") === group), `${group}: ${items}`);
  }
});

Deno.test("a batch that answers with the wrong number of results is not trusted", async () => {
  const submit = coalescer<string, number, number>(
    async (_g, items) => {
      await new Promise((r) => setTimeout(r, 5));
      return items.slice(1);
    },
    async (_g, item) => {
      await new Promise((r) => setTimeout(r, 5));
      return item + 1;
    },
    { maxBatch: 10, maxInFlight: 1 },
  );
  const results = await Promise.all([1, 2, 3, 4].map((i) => submit("g", i)));
  assert.deepEqual(results, [2, 3, 4, 5]);
});
