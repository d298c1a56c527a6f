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
