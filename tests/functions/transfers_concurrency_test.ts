// 8 clients make 10,000 random transfers among 10 hot wallets, each over its
// own connection with queries pipelined in batches. Afterwards: no negative
// balance, the ledger sums to zero per currency, every balance equals its
// entries, and no caller ever saw anything but success or insufficient_funds
// (no deadlock, no serialization failure, no partial write).
import assert from "node:assert/strict";
import postgres from "postgres";
import { createUser, dbTest, freshDatabase } from "../support/harness.ts";

const CLIENTS = 8;
const TRANSFERS = 10_000;
const WALLETS = 10;
const BATCH = 50;
const OPENING = 1_000;

const db = await freshDatabase();

dbTest(
  "10,000 concurrent random transfers among 10 hot wallets keep the ledger exact",
  async () => {
    const users: string[] = [];
    for (let i = 0; i < WALLETS; i++) users.push(await createUser(db));
    for (const user of users) {
      const [tx] = await db
        .sql`select id from public.create_transaction(${user}, 'credit', ${OPENING}, 'RWF')`;
      await db.sql`select public.update_transaction_status(${tx.id}, 'processing')`;
      await db.sql`select public.update_transaction_status(${tx.id}, 'completed')`;
    }

    const clients = Array.from(
      { length: CLIENTS },
      () => postgres(db.url, { max: 1, prepare: false, onnotice: () => {} }),
    );
    const outcomes = { ok: 0, insufficient: 0, other: [] as string[] };
    const started = performance.now();
    try {
      await Promise.all(clients.map(async (sql, c) => {
        const mine = TRANSFERS / CLIENTS;
        for (let done = 0; done < mine; done += BATCH) {
          const batch = Array.from({ length: Math.min(BATCH, mine - done) }, (_, i) => {
            const from = Math.floor(Math.random() * WALLETS);
            const to = (from + 1 + Math.floor(Math.random() * (WALLETS - 1))) % WALLETS;
            const amount = 1 + Math.floor(Math.random() * 400);
            return sql`select id from public.transfer_funds(
              p_amount := ${amount}, p_currency := 'RWF', p_to_user_id := ${users[to]},
              p_from_user_id := ${users[from]}, p_idempotency_key := ${`c${c}-${done + i}`})`
              .then(() => outcomes.ok++)
              .catch((err: { code?: string; message?: string }) => {
                if (err.code === "PT409" && err.message === "insufficient_funds") {
                  outcomes.insufficient++;
                } else outcomes.other.push(`${err.code}: ${err.message}`);
              });
          });
          await Promise.all(batch);
        }
      }));
    } finally {
      await Promise.all(clients.map((c) => c.end()));
    }
    const seconds = (performance.now() - started) / 1000;
    console.log(
      `${TRANSFERS} transfers in ${
        seconds.toFixed(1)
      }s: ${outcomes.ok} settled, ${outcomes.insufficient} insufficient_funds`,
    );

    assert.deepEqual(outcomes.other, [], "no deadlock or other error reached a caller");
    assert.equal(outcomes.ok + outcomes.insufficient, TRANSFERS);
    assert.ok(outcomes.ok > TRANSFERS / 2, "most transfers settled");
    assert.ok(outcomes.insufficient > 0, "the overdraft path was exercised under contention");

    const [{ transfers }] = await db.sql`select count(*)::int as transfers from public.transactions
                                       where type = 'transfer' and status = 'completed'`;
    assert.equal(transfers, outcomes.ok, "exactly the settled transfers were written");
    const [{ keys }] = await db
      .sql`select count(*)::int as keys from public.transaction_idempotency_keys`;
    assert.equal(keys, outcomes.ok, "failed transfers left no idempotency key behind");

    const negative = await db
      .sql`select id from public.wallets where kind = 'user' and (balance < 0 or held < 0 or held > balance)`;
    assert.deepEqual([...negative], [], "no negative balance");

    const sums = await db
      .sql`select currency, sum(amount)::text as total from public.ledger_entries group by currency`;
    assert.deepEqual(
      sums.map((r) => ({ ...r })),
      [{ currency: "RWF", total: "0" }],
      "the ledger sums to zero",
    );

    const drift = await db.sql`
    select w.id from public.wallets w
    left join (select wallet_id, sum(amount) as total from public.ledger_entries group by wallet_id) e
      on e.wallet_id = w.id
    where w.balance <> coalesce(e.total, 0)`;
    assert.deepEqual([...drift], [], "every balance equals its entries");

    const [{ total }] = await db
      .sql`select sum(balance)::int as total from public.wallets where kind = 'user'`;
    assert.equal(total, WALLETS * OPENING, "transfers neither create nor destroy money");

    const [{ unbalanced }] = await db.sql`
    select count(*)::int as unbalanced from (
      select transaction_id from public.ledger_entries group by transaction_id having count(*) <> 2 or sum(amount) <> 0
    ) x`;
    assert.equal(unbalanced, 0, "every transfer wrote exactly two balanced entries");
  },
);

// -----------------------------------------------------------------------------
// A deleted account receives nothing, whatever the interleaving. Each race is
// staged with explicit transactions held open on their own connections, and a
// step waits until a backend is seen blocked on a lock (pg_stat_activity), so
// the outcome does not depend on timing.
// -----------------------------------------------------------------------------

/** A transaction on its own connection, kept open until release(). */
async function hold(statements: (tx: postgres.TransactionSql) => Promise<unknown>) {
  const sql = postgres(db.url, { max: 1, prepare: false, onnotice: () => {} });
  const [{ pid }] = await sql`select pg_backend_pid() as pid`;
  let release!: () => void;
  const released = new Promise<void>((resolve) => release = resolve);
  let entered!: () => void;
  const ready = new Promise<void>((resolve) => entered = resolve);
  const done = sql.begin(async (tx) => {
    await statements(tx);
    entered();
    await released;
  }).finally(() => sql.end());
  // a failure before ready would otherwise leave the caller waiting forever
  await Promise.race([ready, done]);
  return { pid: pid as number, release, done };
}

/** One statement on its own connection, started now; pid is its backend. */
async function start<T>(run: (sql: postgres.Sql) => Promise<T>) {
  const sql = postgres(db.url, { max: 1, prepare: false, onnotice: () => {} });
  const [{ pid }] = await sql`select pg_backend_pid() as pid`;
  const result = run(sql).then(
    (value) => ({ ok: true as const, value }),
    (error: { code?: string; message?: string }) => ({ ok: false as const, error }),
  ).finally(() => sql.end());
  return { pid: pid as number, result };
}

/** Waits until backend pid waits on a lock ("waiting") or `settled` has settled ("done"). */
async function blockedOrDone(pid: number, settled: Promise<unknown>): Promise<"waiting" | "done"> {
  let finished = false;
  settled.finally(() => finished = true);
  const deadline = performance.now() + 20_000;
  while (performance.now() < deadline) {
    if (finished) return "done";
    const [row] = await db.sql`select wait_event_type from pg_stat_activity where pid = ${pid}`;
    if (row?.wait_event_type === "Lock") return "waiting";
    await new Promise((r) => setTimeout(r, 5));
  }
  throw new Error(`backend ${pid} neither finished nor waited on a lock in 20 s`);
}

async function fundedUser(amount: number, phone?: string): Promise<string> {
  const user = await createUser(db, phone);
  const [tx] = await db
    .sql`select id from public.create_transaction(${user}, 'credit', ${amount}, 'RWF')`;
  await db.sql`select public.update_transaction_status(${tx.id}, 'processing')`;
  await db.sql`select public.update_transaction_status(${tx.id}, 'completed')`;
  return user;
}

async function funds(user: string): Promise<string | null> {
  const [row] = await db.sql`select balance::text || '/' || held::text as funds
                             from public.wallets where user_id = ${user} and currency = 'RWF'`;
  return row?.funds ?? null;
}

const transfer = (from: string, to: { id?: string; phone?: string }, key: string) =>
  start((sql) =>
    sql`select id, status from public.transfer_funds(
          p_amount := 10, p_currency := 'RWF', p_to_user_id := ${to.id ?? null},
          p_to_phone := ${
      to.phone ?? null
    }, p_from_user_id := ${from}, p_idempotency_key := ${key})`
  );
const softDelete = (user: string) => (sql: postgres.Sql | postgres.TransactionSql) =>
  sql`update auth.users set deleted_at = now() where id = ${user}`;
const complete = (id: string) =>
  start((sql) => sql`select status from public.update_transaction_status(${id}, 'completed')`);
type Payment = Awaited<ReturnType<typeof start<postgres.RowList<postgres.Row[]>>>>;

/** A transfer from sender to recipient, created and moved to processing. */
async function processingTransfer(sender: string, recipient: string): Promise<string> {
  const [pending] = await db
    .sql`select id from public.create_transaction(${sender}, 'transfer', 10,
                                     'RWF', p_destination_user_id := ${recipient})`;
  await db.sql`select public.update_transaction_status(${pending.id}, 'processing')`;
  return pending.id;
}

/**
 * The recipient's deletion begun while a payment to them waits for the
 * sender's wallet (another transaction holds it): whether the deletion had to
 * wait, and how both ended.
 */
async function deleteWhilePaymentWaits(
  sender: string,
  recipient: string,
  pay: () => Promise<Payment>,
) {
  const wallet = await hold((tx) =>
    tx`select from public.wallets where user_id = ${sender} for no key update`
  );
  const paying = await pay();
  assert.equal(await blockedOrDone(paying.pid, paying.result), "waiting", "the payment waits");
  const deleting = await start(softDelete(recipient));
  const deletion = await blockedOrDone(deleting.pid, deleting.result);
  wallet.release();
  await wallet.done;
  return { deletion, paid: await paying.result, deleted: await deleting.result };
}

/** A payment begun while a deletion is in progress: whether it had to wait, and how it ended. */
async function payWhileDeleting(
  deletion: (tx: postgres.TransactionSql) => Promise<unknown>,
  pay: () => Promise<Payment>,
) {
  const deleting = await hold(deletion);
  const paying = await pay();
  const seen = await blockedOrDone(paying.pid, paying.result);
  deleting.release();
  await deleting.done;
  return { seen, paid: await paying.result };
}

dbTest(
  "a recipient deleted while an immediate transfer waits for a wallet: the deletion waits for it",
  async () => {
    const sender = await fundedUser(100);
    const recipient = await createUser(db);
    // the transfer has checked the recipient and waits for the sender's wallet
    const { deletion, paid, deleted } = await deleteWhilePaymentWaits(
      sender,
      recipient,
      () => transfer(sender, { id: recipient }, "deleted-while-waiting"),
    );

    assert.ok(deleted.ok, JSON.stringify(deleted));
    assert.ok(paid.ok, JSON.stringify(paid));
    assert.equal(
      deletion,
      "waiting",
      `the deletion committed while a payment to the account was in flight, which then paid it: ${
        JSON.stringify(paid.value)
      }, recipient funds ${await funds(recipient)}`,
    );
    // the payment came first and the deletion after it: the account was live when paid
    assert.equal(paid.value[0].status, "completed");
    assert.equal(await funds(recipient), "10/0");
  },
);

dbTest(
  "an immediate transfer meeting a deletion in progress waits for it and pays no one (by id, by phone, hard delete)",
  async () => {
    const sender = await fundedUser(100);
    const cases: [string, string, { id?: string; phone?: string }, string][] = [];
    const byId = await createUser(db);
    cases.push(["soft-deleted, by id", byId, { id: byId }, "update"]);
    const byPhone = await createUser(db, "250788700001");
    cases.push(["soft-deleted, by phone", byPhone, { phone: "+250788700001" }, "update"]);
    // never paid, so no wallet yet: a hard delete is not refused by wallets' foreign key
    const erased = await createUser(db);
    cases.push(["hard-deleted", erased, { id: erased }, "delete"]);

    for (const [label, user, to, how] of cases) {
      const { seen, paid } = await payWhileDeleting(
        (tx) =>
          how === "update" ? softDelete(user)(tx) : tx`delete from auth.users where id = ${user}`,
        () => transfer(sender, to, `in-progress-${label}`),
      );
      assert.equal(
        seen,
        "waiting",
        `${label}: the transfer did not wait for the deletion: ${JSON.stringify(paid)}`,
      );
      assert.ok(!paid.ok, `${label}: a deleted account was paid: ${JSON.stringify(paid)}`);
      assert.deepEqual(
        { code: paid.error.code, message: paid.error.message },
        { code: "PT404", message: "recipient_not_found" },
        label,
      );
      assert.equal(await funds(user), null, `${label}: the deleted account received nothing`);
    }
    assert.equal(await funds(sender), "100/0", "the sender paid nothing");
    const [{ keys }] = await db
      .sql`select count(*)::int as keys from public.transaction_idempotency_keys
                                    where user_id = ${sender}`;
    assert.equal(keys, 0, "the refused transfers stored no idempotency key");
  },
);

dbTest(
  "a recipient deleted while the completion of a transfer waits for a wallet: the deletion waits for it",
  async () => {
    const sender = await fundedUser(100);
    const recipient = await createUser(db);
    const id = await processingTransfer(sender, recipient);
    const { deletion, paid: completed, deleted } = await deleteWhilePaymentWaits(
      sender,
      recipient,
      () => complete(id),
    );

    assert.ok(deleted.ok, JSON.stringify(deleted));
    assert.ok(completed.ok, JSON.stringify(completed));
    assert.equal(
      deletion,
      "waiting",
      `the deletion committed while a completion paying the account was in flight, which then paid it: ${
        JSON.stringify(completed.value)
      }, recipient funds ${await funds(recipient)}`,
    );
    assert.equal(completed.value[0].status, "completed");
    assert.equal(await funds(recipient), "10/0");
    assert.equal(await funds(sender), "90/0");
  },
);

dbTest(
  "completing a transfer while its recipient's deletion is in progress waits for it, then is a 409",
  async () => {
    const sender = await fundedUser(100);
    const recipient = await createUser(db);
    const id = await processingTransfer(sender, recipient);
    const { seen, paid: completed } = await payWhileDeleting(
      softDelete(recipient),
      () => complete(id),
    );

    assert.equal(
      seen,
      "waiting",
      `the completion did not wait for the deletion: ${JSON.stringify(completed)}`,
    );
    assert.ok(!completed.ok, `a deleted account was paid: ${JSON.stringify(completed)}`);
    assert.deepEqual(
      { code: completed.error.code, message: completed.error.message },
      { code: "PT409", message: "recipient_deleted" },
    );
    const [tx] = await db.sql`select status from public.transactions where id = ${id}`;
    assert.equal(tx.status, "processing", "the refused completion changed nothing");
    assert.equal(await funds(recipient), "0/0", "the deleted account received nothing");
    assert.equal(await funds(sender), "100/10", "the sender's hold stays until it is failed");
  },
);
