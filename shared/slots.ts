// A limit on how many operations run at once, first come first served, with a
// bound on how long one waits for its turn. An operation that waits too long
// is refused before it starts, so it has done nothing.

export class Slots {
  #running = 0;
  #waiting: Array<() => void> = [];

  /** Operations waiting for a slot. */
  get waiting(): number {
    return this.#waiting.length;
  }

  /**
   * Runs `op` once fewer than `limit` operations run. If no slot comes free
   * within `timeoutMs`, rejects with `refusal(waitedMs)` and never runs it.
   */
  async run<T>(
    limit: number,
    timeoutMs: number,
    op: () => Promise<T>,
    refusal: (waitedMs: number) => Error,
  ): Promise<T> {
    // nobody jumps the queue: a free slot goes to the longest waiter first
    if (this.#running < limit && this.#waiting.length === 0) this.#running++;
    else await this.#turn(timeoutMs, refusal);
    try {
      return await op();
    } finally {
      this.#release();
    }
  }

  #turn(timeoutMs: number, refusal: (waitedMs: number) => Error): Promise<void> {
    const started = performance.now();
    return new Promise((resolve, reject) => {
      const admit = () => {
        clearTimeout(timer);
        resolve();
      };
      const timer = setTimeout(() => {
        this.#waiting.splice(this.#waiting.indexOf(admit), 1);
        // a refusal that throws still refuses (and does not escape the timer)
        try {
          reject(refusal(performance.now() - started));
        } catch (err) {
          reject(err);
        }
      }, timeoutMs);
      this.#waiting.push(admit);
    });
  }

  #release(): void {
    const next = this.#waiting.shift();
    // the slot passes straight to the next waiter, so the count stays
    if (next) next();
    else this.#running--;
  }
}
