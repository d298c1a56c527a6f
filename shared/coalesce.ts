// Natural batching ("group commit") for small writes that arrive together.
//
// A write goes to the database at once while fewer than `maxInFlight` batches
// of its group are running; otherwise it waits for one of them to finish and
// then goes with everything else that queued meanwhile, as one transaction.
// Nothing is ever held back on a timer, so an idle server adds no latency; a
// busy one commits many writes per round trip and per WAL flush. Every caller
// still gets its own answer only after its own write has committed.
//
// A batch is all or nothing in SQL. If it fails on the callers' input (a 4xx
// other than 401/403), one bad value may have sunk the others, so it is split
// in halves until the bad writes are alone, and each caller gets exactly the
// error (or success) its own write earns. Any other failure (lost connection,
// timeout, a fault on our side, a role refused) would only repeat itself, so
// every caller of the batch gets it as is.

import { isInputError } from "./errors.ts";

export interface CoalesceOptions {
  /** Most writes in one batch. */
  maxBatch: number;
  /** Batches of one group running at the same time. */
  maxInFlight: number;
}

interface Waiter<I, O> {
  item: I;
  resolve: (value: O) => void;
  reject: (reason: unknown) => void;
}

interface Group<I, O> {
  queue: Waiter<I, O>[];
  inFlight: number;
}

/**
 * Returns `submit(group, item)`. Items of one group (for example one caller
 * identity, since a batch runs under one set of claims) may share a batch;
 * `many` must return one result per item, in order.
 */
export function coalescer<G, I, O>(
  many: (group: G, items: I[]) => Promise<O[]>,
  one: (group: G, item: I) => Promise<O>,
  options: CoalesceOptions,
): (group: G, item: I) => Promise<O> {
  const groups = new Map<G, Group<I, O>>();

  async function run(group: G, batch: Waiter<I, O>[]): Promise<void> {
    if (batch.length > 1) {
      try {
        const results = await settled(() => many(group, batch.map((w) => w.item)));
        if (results.length !== batch.length) {
          throw new Error(`coalescer: ${results.length} results for ${batch.length} items`);
        }
        batch.forEach((w, i) => w.resolve(results[i]));
        return;
      } catch (err) {
        // A miscounted answer is not a 4xx either: the batch may have
        // committed, and writing it again would duplicate it.
        if (!isInputError(err)) {
          for (const w of batch) w.reject(err);
          return;
        }
      }
      // Halves, one after the other in this batch's in-flight slot, until the
      // bad writes are alone: about 2 log n writes for one bad item among n.
      const half = Math.ceil(batch.length / 2);
      await run(group, batch.slice(0, half));
      await run(group, batch.slice(half));
      return;
    }
    await settled(() => one(group, batch[0].item)).then(batch[0].resolve, batch[0].reject);
  }

  function pump(group: G, state: Group<I, O>): void {
    while (state.inFlight < options.maxInFlight && state.queue.length > 0) {
      const batch = state.queue.splice(0, options.maxBatch);
      state.inFlight++;
      run(group, batch).finally(() => {
        state.inFlight--;
        if (state.queue.length > 0) pump(group, state);
        else if (state.inFlight === 0) groups.delete(group);
      });
    }
  }

  return (group, item) =>
    new Promise<O>((resolve, reject) => {
      let state = groups.get(group);
      if (!state) groups.set(group, state = { queue: [], inFlight: 0 });
      state.queue.push({ item, resolve, reject });
      pump(group, state);
    });
}

/** Calls `fn` so that a synchronous throw becomes a rejection, not a lost waiter. */
function settled<T>(fn: () => Promise<T>): Promise<T> {
  return Promise.resolve().then(fn);
}
