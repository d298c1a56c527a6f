import assert from "node:assert/strict";
import postgres from "postgres";
import { createClient } from "@supabase/supabase-js";
import { app } from "../../supabase/functions/transactions/index.ts";
import {
  anonToken,
  call,
  createUser,
  dbTest,
  expectError,
  freshDatabase,
  serviceToken,
  startLocalApi,
  userToken,
} from "../support/harness.ts";

// Enough pooled connections that concurrent requests really race in SQL.
Deno.env.set("DB_POOL_SIZE", "24");
const db = await freshDatabase();

const alice = await createUser(db, "250788100001");
const bob = await createUser(db, "250788100002");
const service = await serviceToken();
const aliceToken = await userToken(alice);
const bobToken = await userToken(bob);

let keyCounter = 0;
const newKey = () => `test-${Date.now()}-${++keyCounter}`;

async function post(path: string, token: string, body: unknown, key: string | null = newKey()) {
  return await call(app, "POST", path, {
    token,
    body,
    headers: key === null ? {} : { "idempotency-key": key },
  });
}

/** Credits a user and completes it through the state machine (service role). */
async function fund(user: string, amount: number, currency = "RWF"): Promise<string> {
  const res = await post("/transactions", service, {
    user_id: user,
    type: "credit",
    amount,
    currency,
  });
  assert.equal(res.status, 201, JSON.stringify(res.body));
  for (const status of ["processing", "completed"]) {
    const s = await post(
      `/transactions/${res.body.id}/status`,
      service,
      { new_status: status },
      null,
    );
    assert.equal(s.status, 200, JSON.stringify(s.body));
  }
  return res.body.id;
}

async function counts() {
  const [row] = await db.sql`select (select count(*)::int from public.transactions) as txs,
                                    (select count(*)::int from public.transaction_idempotency_keys) as keys,
                                    (select count(*)::int from public.transaction_events) as events,
                                    (select count(*)::int from public.payment_methods) as methods,
                                    (select coalesce(sum(balance), 0)::text || '/' || coalesce(sum(held), 0)::text
                                     from public.wallets) as money`;
  return row;
}

await fund(alice, 10_000);

dbTest(
  "100 concurrent identical creates make one transaction, and every reply names it",
  async () => {
    const key = newKey();
    const body = { type: "payment", amount: 25, currency: "RWF", description: "race" };
    const replies = await Promise.all(
      Array.from({ length: 100 }, () => post("/transactions", aliceToken, body, key)),
    );
    for (const r of replies) assert.ok([200, 201].includes(r.status), JSON.stringify(r.body));
    assert.equal(replies.filter((r) => r.status === 201).length, 1, "one reply created it");
    const ids = new Set(replies.map((r) => r.body.id));
    assert.equal(ids.size, 1);
    const [id] = ids;
    const rows = await db
      .sql`select id, amount::text, status from public.transactions where idempotency_key = ${key}`;
    assert.deepEqual(rows.map((r) => ({ ...r })), [{ id, amount: "25", status: "pending" }]);
    const [w] = await db
      .sql`select held::text from public.wallets where user_id = ${alice} and currency = 'RWF'`;
    assert.equal(w.held, "25", "the hold was taken once");
  },
);

dbTest("100 identical SQL calls racing on 100 connections also make one transaction", async () => {
  const clients = Array.from(
    { length: 100 },
    () => postgres(db.url, { max: 1, onnotice: () => {} }),
  );
  try {
    await Promise.all(clients.map((c) => c`select 1`));
    const key = newKey();
    const ids = await Promise.all(clients.map(async (c) => {
      const [row] = await c`select id from public.create_transaction(
        p_user_id := ${bob}, p_type := 'credit', p_amount := 100.00, p_currency := 'RWF',
        p_idempotency_key := ${key})`;
      return row.id as string;
    }));
    assert.equal(new Set(ids).size, 1);
    const [{ n }] = await db
      .sql`select count(*)::int as n from public.transactions where idempotency_key = ${key}`;
    assert.equal(n, 1);
  } finally {
    await Promise.all(clients.map((c) => c.end()));
  }
});

dbTest("the same key with a different amount is a 409 and writes nothing", async () => {
  const key = newKey();
  const first = await post("/transactions", aliceToken, {
    type: "payment",
    amount: 10,
    currency: "RWF",
  }, key);
  assert.equal(first.status, 201);
  const before = await counts();
  const again = await post("/transactions", aliceToken, {
    type: "payment",
    amount: 11,
    currency: "RWF",
  }, key);
  expectError(again, 409, "idempotency_key_reused");
  assert.deepEqual(await counts(), before);
  const replay = await post("/transactions", aliceToken, {
    type: "payment",
    amount: "10",
    currency: "RWF",
  }, key);
  assert.equal(replay.status, 200, "a replay creates nothing");
  assert.equal(replay.headers.get("idempotent-replayed"), "true");
  assert.equal(first.headers.get("idempotent-replayed"), null);
  assert.equal(replay.body.id, first.body.id);
  assert.equal(replay.body.amount, "10");
});

dbTest("bad input is a 400 and writes nothing", async () => {
  const before = await counts();
  const bad: Array<[unknown, string | null, string]> = [
    [{ type: "payment", amount: -5, currency: "RWF" }, newKey(), "invalid_request"],
    [{ type: "payment", amount: 0, currency: "RWF" }, newKey(), "invalid_request"],
    [{ type: "payment", amount: "abc", currency: "RWF" }, newKey(), "invalid_request"],
    [{ type: "payment", amount: 5, currency: "rwf" }, newKey(), "invalid_request"],
    [{ type: "payment", amount: 5, currency: "XYZ" }, newKey(), "invalid_currency"],
    [{ type: "payment", amount: 5.5, currency: "RWF" }, newKey(), "invalid_amount_precision"],
    // a double past 15 significant digits: read as ...02, so refused, not rounded
    [{ type: "payment", amount: 100000000000000.01, currency: "USD" }, newKey(), "invalid_request"],
    [{ type: "payment", amount: "1.001", currency: "USD" }, newKey(), "invalid_amount_precision"],
    [{ type: "loan", amount: 5, currency: "RWF" }, newKey(), "invalid_request"],
    [{ type: "payment", amount: 5, currency: "RWF", surprise: 1 }, newKey(), "invalid_request"],
    [{ type: "payment", amount: 5, currency: "RWF", metadata: [1] }, newKey(), "invalid_request"],
    [{ type: "transfer", amount: 5, currency: "RWF" }, newKey(), "destination_required"],
    [{ type: "payment", amount: 5, currency: "RWF" }, null, "idempotency_key_required"],
    [{ type: "payment", amount: 5, currency: "RWF" }, "has space", "invalid_idempotency_key"],
    ["{not json", newKey(), "invalid_json"],
    [{ type: "payment", amount: 5, currency: "RWF" }, "k".repeat(256), "invalid_idempotency_key"],
  ];
  for (const [body, key, code] of bad) {
    expectError(await post("/transactions", aliceToken, body, key), 400, code);
  }
  const backdated = {
    type: "payment",
    amount: 5,
    currency: "RWF",
    created_at: "2026-01-01T00:00:00Z",
  };
  expectError(await post("/transactions", aliceToken, backdated, newKey()), 403, "forbidden");
  expectError(
    await post("/transactions/transfers", aliceToken, { amount: 5, currency: "RWF" }),
    400,
    "invalid_request",
  );
  expectError(
    await post("/transactions/transfers", aliceToken, {
      to_user_id: bob,
      to_phone: "+250788100002",
      amount: 5,
      currency: "RWF",
    }),
    400,
    "invalid_request",
  );
  expectError(
    await post("/transactions/transfers", aliceToken, {
      to_user_id: alice,
      amount: 5,
      currency: "RWF",
    }),
    400,
    "self_transfer",
  );
  expectError(
    await call(app, "GET", "/transactions/not-a-uuid", { token: aliceToken }),
    400,
    "invalid_request",
  );
  expectError(
    await call(app, "GET", "/transactions?limit=0", { token: aliceToken }),
    400,
    "invalid_request",
  );
  expectError(
    await call(app, "GET", "/transactions?cursor=garbage", { token: aliceToken }),
    400,
    "invalid_cursor",
  );
  expectError(
    await post(
      "/transactions/payment-methods",
      aliceToken,
      { type: "card", account_number: "12" },
      null,
    ),
    400,
    "invalid_request",
  );
  expectError(
    await call(
      app,
      "GET",
      "/transactions?from=2026-02-01T00:00:00Z&to=2026-01-01T00:00:00Z",
      { token: aliceToken },
    ),
    400,
    "invalid_window",
  );
  assert.deepEqual(await counts(), before);
});

dbTest("anon and missing tokens get 401 on every route", async () => {
  const anon = await anonToken();
  const id = crypto.randomUUID();
  const routes: Array<[string, string]> = [
    ["POST", "/transactions"],
    ["GET", "/transactions"],
    ["GET", `/transactions/${id}`],
    ["POST", `/transactions/${id}/status`],
    ["GET", `/transactions/${id}/events`],
    ["POST", "/transactions/transfers"],
    ["GET", "/transactions/balances"],
    ["GET", "/transactions/payment-methods"],
    ["POST", "/transactions/payment-methods"],
    ["POST", `/transactions/payment-methods/${id}/default`],
    ["DELETE", `/transactions/payment-methods/${id}`],
  ];
  const before = await counts();
  for (const [method, path] of routes) {
    const body = method === "POST" ? { type: "credit", amount: 1, currency: "RWF" } : undefined;
    const headers = { "idempotency-key": newKey() };
    expectError(await call(app, method, path, { token: anon, body, headers }), 401);
    expectError(await call(app, method, path, { body, headers }), 401, "missing_token");
  }
  assert.deepEqual(await counts(), before);
});

dbTest(
  "a user cannot read, update or spend another user's anything, nor credit themselves",
  async () => {
    const pay = await post("/transactions", aliceToken, {
      type: "payment",
      amount: 5,
      currency: "RWF",
    });
    assert.equal(pay.status, 201);
    const method = await post("/transactions/payment-methods", aliceToken, {
      type: "mobile_money",
      account_number: "0788100001",
    }, null);
    assert.equal(method.status, 201, JSON.stringify(method.body));
    const before = await counts();

    expectError(await call(app, "GET", `/transactions/${pay.body.id}`, { token: bobToken }), 404);
    expectError(
      await call(app, "GET", `/transactions/${pay.body.id}/events`, { token: bobToken }),
      404,
    );
    expectError(
      await post(
        `/transactions/${pay.body.id}/status`,
        bobToken,
        { new_status: "cancelled" },
        null,
      ),
      403,
    );
    expectError(
      await post("/transactions", bobToken, {
        user_id: alice,
        type: "payment",
        amount: 1,
        currency: "RWF",
      }),
      403,
      "forbidden",
    );
    for (const type of ["credit", "refund", "commission"]) {
      expectError(
        await post("/transactions", bobToken, { type, amount: 1000, currency: "RWF" }),
        403,
        "type_not_allowed",
      );
    }
    expectError(
      await post("/transactions/transfers", bobToken, {
        from_user_id: alice,
        to_user_id: bob,
        amount: 1,
        currency: "RWF",
      }),
      403,
      "forbidden",
    );
    expectError(
      await post("/transactions", bobToken, {
        type: "payment",
        amount: 1,
        currency: "RWF",
        payment_method_id: method.body.id,
      }),
      404,
      "payment_method_not_found",
    );
    expectError(
      await post(
        `/transactions/payment-methods/${method.body.id}/default`,
        bobToken,
        undefined,
        null,
      ),
      404,
    );
    expectError(
      await call(app, "DELETE", `/transactions/payment-methods/${method.body.id}`, {
        token: bobToken,
      }),
      404,
    );
    expectError(
      await post("/transactions/transfers", bobToken, {
        to_user_id: alice,
        amount: 1,
        currency: "RWF",
      }),
      409,
      "insufficient_funds",
    );
    // the refusal gives the amount as text, as amounts are: a JSON number loses the cents
    const big = await post("/transactions", bobToken, {
      type: "payment",
      amount: "99999999999999.99",
      currency: "USD",
    });
    expectError(big, 409, "insufficient_funds");
    assert.equal(big.body.error.details.amount, "99999999999999.99");
    assert.deepEqual(await counts(), before);

    const list = await call(app, "GET", "/transactions", { token: bobToken });
    assert.equal(list.status, 200);
    assert.ok(
      list.body.data.every((t: { user_id: string; destination_user_id: string | null }) =>
        t.user_id === bob || t.destination_user_id === bob
      ),
    );
    const balances = await call(app, "GET", `/transactions/balances?user_id=${alice}`, {
      token: bobToken,
    });
    assert.deepEqual(
      balances.body.data.map((b: { user_id: string }) => b.user_id).filter((u: string) =>
        u !== bob
      ),
      [],
    );
    const methods = await call(app, "GET", "/transactions/payment-methods", { token: bobToken });
    assert.deepEqual(methods.body.data, []);

    // The service role lists one user's at a time.
    for (const path of ["/transactions/balances", "/transactions/payment-methods"]) {
      expectError(await call(app, "GET", path, { token: service }), 400, "user_id_required");
    }
    // ... and names the user it writes for.
    expectError(
      await post("/transactions", service, { type: "credit", amount: 5, currency: "RWF" }),
      400,
      "invalid_user",
    );
    expectError(
      await post("/transactions/payment-methods", service, { type: "cash" }, null),
      400,
      "invalid_user",
    );
    const aliceWallets = await call(app, "GET", `/transactions/balances?user_id=${alice}`, {
      token: service,
    });
    assert.equal(aliceWallets.status, 200);
    assert.ok(aliceWallets.body.data.length > 0);
    assert.deepEqual(
      [...new Set(aliceWallets.body.data.map((b: { user_id: string }) => b.user_id))],
      [alice],
    );
  },
);

dbTest("the state machine over HTTP, with events and balances", async () => {
  const created = await post("/transactions", aliceToken, {
    type: "payment",
    amount: 300,
    currency: "RWF",
    category: "airtime",
  });
  assert.equal(created.status, 201);
  const id = created.body.id;
  assert.match(created.body.reference, /^TX-\d{6}-[0-9A-F]{16}$/);
  expectError(
    await post(`/transactions/${id}/status`, service, { new_status: "completed" }, null),
    409,
    "illegal_transition",
  );
  const p = await post(`/transactions/${id}/status`, service, {
    new_status: "processing",
    reason: "sent to provider",
  }, null);
  assert.equal(p.body.status, "processing");
  const c = await post(`/transactions/${id}/status`, service, { new_status: "completed" }, null);
  assert.equal(c.body.status, "completed");
  assert.ok(c.body.completed_at);
  expectError(
    await post(`/transactions/${id}/status`, service, { new_status: "failed" }, null),
    409,
    "illegal_transition",
  );
  expectError(
    await post(`/transactions/${id}/status`, service, { new_status: "done" }, null),
    400,
    "invalid_request",
  );
  expectError(
    await post(
      `/transactions/${crypto.randomUUID()}/status`,
      service,
      { new_status: "processing" },
      null,
    ),
    404,
  );

  const events = await call(app, "GET", `/transactions/${id}/events`, { token: aliceToken });
  assert.deepEqual(events.body.data.map((e: { new_status: string }) => e.new_status), [
    "processing",
    "completed",
  ]);
  assert.equal(events.body.data[0].reason, "sent to provider");
  assert.equal(events.body.data[0].correlation_id, p.headers.get("x-correlation-id"));

  const got = await call(app, "GET", `/transactions/${id}`, { token: aliceToken });
  assert.equal(got.body.status, "completed");
  assert.equal(got.body.amount, "300");
});

dbTest("transfers by id and by phone settle at once; the recipient sees them", async () => {
  const bobRwf = async () =>
    Number(
      (await db.sql`select coalesce(sum(balance), 0)::text as b from public.wallets
                    where user_id = ${bob} and currency = 'RWF'`)[0].b,
    );
  const bobBefore = await bobRwf();
  const byPhone = await post("/transactions/transfers", aliceToken, {
    to_phone: "+250788100002",
    amount: "150",
    currency: "RWF",
  });
  assert.equal(byPhone.status, 201, JSON.stringify(byPhone.body));
  assert.equal(byPhone.body.status, "completed");
  assert.equal(byPhone.body.destination_user_id, bob);
  const transferKey = newKey();
  const transfer = { to_user_id: bob, amount: 50, currency: "RWF" };
  const byId = await post("/transactions/transfers", aliceToken, transfer, transferKey);
  assert.equal(byId.status, 201);
  assert.equal(byId.body.status, "completed");
  const byIdAgain = await post("/transactions/transfers", aliceToken, transfer, transferKey);
  assert.equal(byIdAgain.status, 200, "a replayed transfer moves no money");
  assert.equal(byIdAgain.headers.get("idempotent-replayed"), "true");
  assert.equal(byIdAgain.body.id, byId.body.id);
  expectError(
    await post("/transactions/transfers", aliceToken, {
      to_phone: "+250700000009",
      amount: 1,
      currency: "RWF",
    }),
    404,
    "recipient_not_found",
  );
  const seen = await call(app, "GET", `/transactions/${byId.body.id}`, { token: bobToken });
  assert.equal(seen.status, 200);
  const balances = await call(app, "GET", "/transactions/balances", { token: bobToken });
  const rwf = balances.body.data.find((b: { currency: string }) => b.currency === "RWF");
  const [w] = await db
    .sql`select balance::text from public.wallets where user_id = ${bob} and currency = 'RWF'`;
  assert.equal(rwf.balance, w.balance);
  assert.equal(Number(rwf.balance), bobBefore + 200, "the 150 and the 50 settled once each");

  // The recipient reads the history of a transfer they received, like the sender.
  const reversed = await post(`/transactions/${byId.body.id}/status`, service, {
    new_status: "reversed",
    reason: "sent by mistake",
  }, null);
  assert.equal(reversed.status, 200, JSON.stringify(reversed.body));
  for (const token of [bobToken, aliceToken]) {
    const history = await call(app, "GET", `/transactions/${byId.body.id}/events`, { token });
    assert.equal(history.status, 200);
    assert.deepEqual(history.body.data.map((e: { new_status: string }) => e.new_status), [
      "reversed",
    ]);
  }
});

dbTest("listing pages with a cursor and filters", async () => {
  for (let i = 0; i < 5; i++) {
    const fee = await post("/transactions", aliceToken, {
      type: "fee",
      amount: 1,
      currency: "RWF",
      category: "list-test",
    });
    assert.equal(fee.status, 201, JSON.stringify(fee.body));
  }
  const seen: string[] = [];
  let cursor: string | null = null;
  do {
    const path: string = `/transactions?type=fee&status=pending&currency=RWF&limit=2${
      cursor ? `&cursor=${cursor}` : ""
    }`;
    const page = await call(app, "GET", path, { token: aliceToken });
    assert.equal(page.status, 200, JSON.stringify(page.body));
    assert.ok(page.body.data.length <= 2);
    seen.push(...page.body.data.map((t: { id: string }) => t.id));
    cursor = page.body.next_cursor;
  } while (cursor);
  const rows = await db
    .sql`select id from public.transactions where user_id = ${alice} and type = 'fee'
                            and status = 'pending' order by created_at desc, id desc`;
  assert.ok(seen.length >= 5, "the five fees are listed");
  assert.deepEqual(seen, rows.map((r) => r.id));
  const future = await call(
    app,
    "GET",
    `/transactions?from=${encodeURIComponent(new Date(Date.now() + 3600_000).toISOString())}`,
    {
      token: aliceToken,
    },
  );
  assert.deepEqual(future.body.data, []);
  const all = await call(app, "GET", `/transactions?user_id=${alice}&limit=500`, {
    token: service,
  });
  const [{ n }] = await db.sql`select count(*)::int as n
                              from public.list_transactions(p_user_id := ${alice}, p_limit := 500)`;
  assert.equal(all.status, 200);
  assert.equal(all.body.data.length, n);
  assert.ok(n >= rows.length);
});

dbTest("payment methods: masked, one default, removable", async () => {
  const user = await createUser(db);
  const token = await userToken(user);
  const a = await post("/transactions/payment-methods", token, {
    type: "card",
    account_number: "4111 1111 1111 1111",
    provider: "visa",
  }, null);
  assert.equal(a.status, 201);
  assert.equal(a.body.account_number_masked, "****1111");
  assert.equal(a.body.is_default, true);
  assert.ok(!("encrypted_details" in a.body));
  const b = await post("/transactions/payment-methods", token, {
    type: "mobile_money",
    account_number: "0788999888",
    details: { name: "X" },
  }, null);
  const d = await post(
    `/transactions/payment-methods/${b.body.id}/default`,
    token,
    undefined,
    null,
  );
  assert.equal(d.body.is_default, true);
  const list = await call(app, "GET", "/transactions/payment-methods", { token });
  assert.deepEqual(
    list.body.data.filter((m: { is_default: boolean }) => m.is_default).map((m: { id: string }) =>
      m.id
    ),
    [b.body.id],
  );
  expectError(
    await post("/transactions/payment-methods", token, {
      type: "card",
      account_number: "4111111111111111",
      is_verified: true,
    }, null),
    400,
  );
  const del = await call(app, "DELETE", `/transactions/payment-methods/${a.body.id}`, { token });
  assert.equal(del.status, 204);
  const after = await call(app, "GET", "/transactions/payment-methods", { token });
  assert.deepEqual(after.body.data.map((m: { id: string }) => m.id), [b.body.id]);
});

dbTest("end to end over HTTP with supabase-js functions.invoke", async () => {
  const api = await startLocalApi();
  try {
    const supabase = createClient(api.url, await anonToken(), {
      auth: { persistSession: false, autoRefreshToken: false },
      global: { headers: { Authorization: `Bearer ${aliceToken}` } },
    });
    const key = newKey();
    const { data, error } = await supabase.functions.invoke("transactions", {
      body: { type: "payment", amount: 7, currency: "RWF" },
      headers: { "Idempotency-Key": key },
    });
    assert.equal(error, null);
    assert.equal(data.amount, "7");
    const again = await supabase.functions.invoke("transactions", {
      body: { type: "payment", amount: 7, currency: "RWF" },
      headers: { "Idempotency-Key": key },
    });
    assert.equal(again.data.id, data.id);
  } finally {
    await api.close();
  }
});

/**
 * Runs `call` while `user`'s removal of payment method `id` is done but not
 * committed, commits the removal 100 ms later, and returns the call's answer.
 */
async function whileRemoving<T>(user: string, id: string, call: () => Promise<T>): Promise<T> {
  let removed!: () => void;
  const isRemoved = new Promise<void>((r) => (removed = r));
  let commit!: () => void;
  const committed = new Promise<void>((r) => (commit = r));
  const removal = db.sql.begin(async (tx) => {
    await tx`select set_config('role', 'authenticated', true),
                    set_config('request.jwt.claims',
                      ${JSON.stringify({ role: "authenticated", sub: user })}, true)`;
    await tx`select public.remove_payment_method(${id})`;
    removed();
    await committed;
  });
  await isRemoved;
  const answer = call();
  await new Promise((r) => setTimeout(r, 100));
  commit();
  await removal;
  return await answer;
}

// The default is set under the owner's lock; a removal that held it first is
// seen, so the call is a 404 that changes nothing (it used to clear the
// owner's current default and then find nothing to set).
dbTest("setting as default a method being removed is a 404 and leaves the default", async () => {
  const user = await createUser(db, "250788100077");
  const token = await userToken(user);
  const add = async (account: string) =>
    (await post("/transactions/payment-methods", token, {
      type: "mobile_money",
      account_number: account,
    }, null)).body.id as string;
  const first = await add("0788100071");
  const second = await add("0788100072");
  await post(`/transactions/payment-methods/${first}/default`, token, undefined, null);
  const setting = await whileRemoving(
    user,
    second,
    () => post(`/transactions/payment-methods/${second}/default`, token, undefined, null),
  );
  expectError(setting, 404);
  const rows = await db.sql`select id, is_default from public.payment_methods
                            where user_id = ${user} and deleted_at is null`;
  assert.deepEqual(rows.map((r) => [r.id, r.is_default]), [[first, true]]);
});

// A failed statement's text reaches the server log and every statement's
// pg_stat_activity: an account number must travel as a bound parameter.
dbTest("an account number never appears in statement text", async () => {
  const number = `07881${String(Date.now()).slice(-5)}`;
  const added = await post("/transactions/payment-methods", aliceToken, {
    type: "mobile_money",
    account_number: number,
    details: { holder: "Alice" },
  }, null);
  assert.equal(added.status, 201, JSON.stringify(added.body));
  assert.equal(added.body.account_number_masked, `****${number.slice(-4)}`);
  const seen = await db.sql`select count(*)::int as n from pg_stat_activity
                            where query like ${"%" + number + "%"} and pid <> pg_backend_pid()`;
  assert.equal(seen[0].n, 0);
});

// A transaction and the removal of its payment method are ordered by the
// method's row lock: one removed first is a 404, never a reference to a gone
// method.
dbTest("a transaction on a payment method being removed is a 404", async () => {
  const user = await createUser(db, "250788100078");
  const token = await userToken(user);
  await fund(user, 100);
  const method = await post("/transactions/payment-methods", token, {
    type: "mobile_money",
    account_number: "0788100078",
  }, null);
  const paying = await whileRemoving(user, method.body.id, () =>
    post("/transactions", token, {
      type: "payment",
      amount: 5,
      currency: "RWF",
      payment_method_id: method.body.id,
    }));
  expectError(paying, 404, "payment_method_not_found");
  const [row] = await db.sql`select count(*)::int as n from public.transactions
                             where payment_method_id = ${method.body.id}`;
  assert.equal(row.n, 0);
});
