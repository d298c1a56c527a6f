// shared/coalesce.ts: writes that arrive together share a batch, each caller
// gets its own result, a batch failed by the callers' input is halved until
// the bad writes are alone, and any other failure reaches every caller as it is.
import assert from "node:assert/strict";
import { coalescer } from "../../shared/coalesce.ts";
import { HttpError } from "../../shared/errors.ts";

const badInput = (what: string) => new HttpError(400, "invalid_input", `${what} failed`);

/**
 * A fake backend that records the batches it is handed and answers later. A
 * batch holding a failing item fails with `batchError`, by default the 400 a
 * bad value earns.
 */
function backend(
  failWhen: (item: number) => boolean = () => false,
  batchError: () => unknown = () => badInput("batch"),
) {
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
    if (items.some(failWhen)) throw batchError();
    return items.map((i) => i * 10);
  };
  const one = async (_group: string, item: number) => {
    singles.push(item);
    maxRunning = Math.max(maxRunning, ++running);
    await tick();
    running--;
    if (failWhen(item)) throw badInput(`item ${item}`);
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

Deno.test("a batch failed by the input is halved until only the bad write fails", async () => {
  const b = backend((i) => i === 7);
  const submit = coalescer(b.many, b.one, { maxBatch: 100, maxInFlight: 1 });
  const settled = await Promise.allSettled(Array.from({ length: 12 }, (_, i) => submit("g", i)));
  settled.forEach((s, i) => {
    if (i === 7) {
      assert.equal(s.status, "rejected");
      const reason = (s as PromiseRejectedResult).reason;
      assert.ok(reason instanceof HttpError && reason.status === 400, String(reason));
      assert.match(reason.message, /item 7 failed/);
    } else {
      assert.deepEqual(s, { status: "fulfilled", value: i * 10 });
    }
  });
  // Item 0 went alone; 1..11 failed as a batch and was halved around item 7.
  assert.deepEqual(b.batches, [
    [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11],
    [1, 2, 3, 4, 5, 6],
    [7, 8, 9, 10, 11],
    [7, 8, 9],
    [7, 8],
    [10, 11],
  ]);
  assert.deepEqual(b.singles, [0, 7, 8, 9]);
  // The halves went one at a time, in the batch's slot.
  assert.equal(b.maxRunning(), 1);
});

Deno.test("a role refused (401/403) fails the whole batch: every item has the same claims", async () => {
  for (
    const failure of [
      new HttpError(401, "login_required", "x"),
      new HttpError(403, "forbidden", "x"),
    ]
  ) {
    const b = backend((i) => i === 3, () => failure);
    const submit = coalescer(b.many, b.one, { maxBatch: 100, maxInFlight: 1 });
    const settled = await Promise.allSettled(Array.from({ length: 6 }, (_, i) => submit("g", i)));
    for (const s of settled.slice(1)) assert.equal((s as PromiseRejectedResult).reason, failure);
    assert.deepEqual(b.batches, [[1, 2, 3, 4, 5]]);
    assert.deepEqual(b.singles, [0]);
  }
});

Deno.test("a batch failed by anything but the input fails every caller in it, unretried", async () => {
  const failures = [
    new HttpError(503, "timeout", "the database took too long; try again"),
    new HttpError(500, "internal_error", "something went wrong on our side"),
    Object.assign(new Error("write CONNECTION_CLOSED"), { code: "CONNECTION_CLOSED" }),
  ];
  for (const failure of failures) {
    const b = backend((i) => i === 7, () => failure);
    const submit = coalescer(b.many, b.one, { maxBatch: 100, maxInFlight: 1 });
    const settled = await Promise.allSettled(Array.from({ length: 12 }, (_, i) => submit("g", i)));
    assert.deepEqual(settled[0], { status: "fulfilled", value: 0 });
    for (const s of settled.slice(1)) {
      assert.equal(s.status, "rejected");
      assert.equal((s as PromiseRejectedResult).reason, failure);
    }
    assert.deepEqual(b.batches, [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]);
    // Item 0 went alone before the batch; nothing of the batch was retried.
    assert.deepEqual(b.singles, [0]);
  }
});

Deno.test("writes that throw synchronously still settle every caller", async () => {
  for (const batchError of [badInput("batch"), new TypeError("not a function")]) {
    const singles: number[] = [];
    const submit = coalescer<string, number, number>(
      () => {
        throw batchError;
      },
      (_g, item) => {
        singles.push(item);
        if (item % 3 === 0) throw badInput(`item ${item}`);
        return Promise.resolve(item * 10);
      },
      { maxBatch: 100, maxInFlight: 1 },
    );
    const settled = await Promise.allSettled(Array.from({ length: 6 }, (_, i) => submit("g", i)));
    // Item 0 went alone and threw; 1..5 queued behind it and went as a batch.
    assert.equal(settled[0].status, "rejected");
    assert.match(String((settled[0] as PromiseRejectedResult).reason), /item 0 failed/);
    if (batchError instanceof HttpError) {
      // The 400 sends each write alone; only item 3's own throw fails it.
      assert.deepEqual(singles, [0, 1, 2, 3, 4, 5]);
      settled.slice(1).forEach((s, n) => {
        const i = n + 1;
        if (i === 3) {
          assert.equal(s.status, "rejected");
          assert.match(String((s as PromiseRejectedResult).reason), /item 3 failed/);
        } else {
          assert.deepEqual(s, { status: "fulfilled", value: i * 10 });
        }
      });
    } else {
      assert.deepEqual(singles, [0]);
      for (const s of settled.slice(1)) {
        assert.equal(s.status, "rejected");
        assert.equal((s as PromiseRejectedResult).reason, batchError);
      }
    }
  }
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
  const singles: number[] = [];
  const submit = coalescer<string, number, number>(
    async (_g, items) => {
      await new Promise((r) => setTimeout(r, 5));
      return items.slice(1);
    },
    async (_g, item) => {
      singles.push(item);
      await new Promise((r) => setTimeout(r, 5));
      return item + 1;
    },
    { maxBatch: 10, maxInFlight: 1 },
  );
  const settled = await Promise.allSettled([1, 2, 3, 4].map((i) => submit("g", i)));
  // Item 1 went alone. The batch of 2..4 may have committed, so it is not
  // written again one by one: each of its callers hears of the mismatch.
  assert.deepEqual(settled[0], { status: "fulfilled", value: 2 });
  for (const s of settled.slice(1)) {
    assert.equal(s.status, "rejected");
    assert.match(String((s as PromiseRejectedResult).reason), /2 results for 3 items/);
  }
  assert.deepEqual(singles, [1]);
});
