import assert from "node:assert/strict";
import postgres from "postgres";
import { app } from "../../supabase/functions/queues/index.ts";
import {
  anonToken,
  call,
  createUser,
  dbTest,
  expectError,
  freshDatabase,
  serviceToken,
  userToken,
} from "../support/harness.ts";

Deno.env.set("DB_POOL_SIZE", "16");
const db = await freshDatabase();
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** A consumer with its own connection, acting as the service role. */
async function consumer() {
  const sql = postgres(db.url, { max: 1, onnotice: () => {}, prepare: false });
  await sql`set role service_role`;
  return sql;
}

const count = async (queue: string) =>
  (await db.sql`select count(*)::int as n from public.message_queue where queue_name = ${queue}`)[0]
    .n;

dbTest("send one message; the same Idempotency-Key returns it", async () => {
  const token = await serviceToken();
  const headers = { "idempotency-key": "order-42" };
  const first = await call(app, "POST", "/queues/orders/messages", {
    token,
    headers,
    body: { payload: { order: 42 }, message_type: "order_placed", priority: 3 },
  });
  assert.equal(first.status, 201, JSON.stringify(first.body));
  assert.equal(first.body.message.status, "pending");
  const again = await call(app, "POST", "/queues/orders/messages", {
    token,
    headers,
    body: { payload: { order: 42 }, message_type: "order_placed", priority: 3 },
  });
  assert.equal(again.status, 200);
  assert.equal(again.headers.get("idempotent-replayed"), "true");
  assert.equal(again.body.message.id, first.body.message.id);
  const other = await call(app, "POST", "/queues/orders/messages", {
    token,
    headers,
    body: { payload: { order: 43 }, message_type: "order_placed" },
  });
  expectError(other, 409, "idempotency_key_conflict");
});

// Senders set a message's size, a claim may ask for 1,000: a claim whose
// answer could not be carried leased them all, answered 500, and claimed again
// and again, dead-lettered them undelivered.
dbTest("a claim answers at most 4 MiB of messages and hands the rest back", async () => {
  await db.sql`select public.send_message('big', jsonb_build_object('blob', repeat('x', 900000),
                                                                    'n', i))
               from generate_series(1, 6) i`;
  const token = await serviceToken();
  const claimed = await call(app, "POST", "/queues/big/claim", { token, body: { limit: 10 } });
  assert.equal(claimed.status, 200);
  // 4.5 MB as of the fifth; the sixth starts past 4 MiB
  assert.deepEqual(claimed.body.messages.map((m: { payload: { n: number } }) => m.payload.n), [
    1,
    2,
    3,
    4,
    5,
  ]);
  const [sixth] = await db.sql`select status, attempts, lease_token from public.message_queue
                               where queue_name = 'big' and payload ->> 'n' = '6'`;
  assert.deepEqual([sixth.status, sixth.attempts, sixth.lease_token], ["pending", 0, null]);
  const popped = await call(app, "POST", "/queues/big/pop", { token, body: { limit: 10 } });
  assert.deepEqual(popped.body.messages.map((m: { payload: { n: number } }) => m.payload.n), [6]);
});

// The lease expiry of a claim sweeps every queue, and a dead-lettered group
// head's promotion needs READ COMMITTED: a REPEATABLE READ claim of any queue
// was refused while some other queue's grouped head had run out its lease.
dbTest("a REPEATABLE READ claim works beside another queue's expired group head", async () => {
  const sql = await consumer();
  try {
    await sql`select public.send_message('rr-grp', '{}', p_group_key := 'g', p_max_attempts := 1)`;
    await sql`select public.send_message('rr-grp', '{}', p_group_key := 'g')`;
    await sql`select id from public.claim_messages('rr-grp', 1, 0.1)`;
    await sleep(200);
    await sql`select public.send_message('rr-plain', '{"n": 1}')`;
    const claimed = await sql.begin(
      "isolation level repeatable read",
      (tx) => tx`select payload from public.claim_messages('rr-plain', 1, 30)`,
    );
    assert.deepEqual(claimed.map((r) => r.payload), [{ n: 1 }]);
    // the group's expiry was left to a READ COMMITTED claim, which promotes
    const next = await sql`select status from public.claim_messages('rr-grp', 1, 30)`;
    assert.deepEqual(next.map((r) => r.status), ["processing"]);
    const states = await db.sql`select status from public.message_queue
                                where queue_name = 'rr-grp' order by id`;
    assert.deepEqual(states.map((r) => r.status), ["dead", "processing"]);
  } finally {
    await sql.end();
  }
});

dbTest("the routes that take no body refuse one, and change nothing", async () => {
  const token = await serviceToken();
  const ids =
    (await db.sql`select (public.send_message('nobody', '{}')).id from generate_series(1, 3)`)
      .map((r) => String(r.id));
  const archive = await call(app, "POST", `/queues/nobody/messages/${ids[0]}/archive`, {
    token,
    body: { message_ids: [ids[1], ids[2]] },
  });
  expectError(archive, 400, "invalid_request");
  const remove = await call(app, "DELETE", `/queues/nobody/messages/${ids[1]}`, {
    token,
    body: { confirm: false },
  });
  expectError(remove, 400, "invalid_request");
  const redrive = await call(app, "POST", `/queues/nobody/messages/${ids[2]}/redrive`, {
    token,
    body: "not json at all",
  });
  expectError(redrive, 400, "invalid_json");
  const states = await db.sql`select status from public.message_queue
                              where queue_name = 'nobody' order by id`;
  assert.deepEqual(states.map((r) => r.status), ["pending", "pending", "pending"]);
  // nothing, or an empty object, is no body
  const archived = await call(app, "POST", `/queues/nobody/messages/${ids[0]}/archive`, {
    token,
    body: {},
  });
  assert.equal(archived.status, 200);
  const deleted = await call(app, "DELETE", `/queues/nobody/messages/${ids[1]}`, { token });
  assert.equal(deleted.status, 200);
});

dbTest("a message keyed in the header and the body takes one key: a second is 400", async () => {
  const token = await serviceToken();
  const send = (header: string, key: string) =>
    call(app, "POST", "/queues/two-keys/messages", {
      token,
      headers: { "idempotency-key": header },
      body: { payload: {}, idempotency_key: key },
    });
  expectError(await send("one", "two"), 400, "idempotency_key_mismatch");
  expectError(await send("bad key with spaces", "two"), 400, "invalid_idempotency_key");
  assert.equal(await count("two-keys"), 0);
  const same = await send("one", "one");
  assert.equal(same.status, 201, JSON.stringify(same.body));
  assert.equal(same.body.message.idempotency_key, "one");
});

// 256 is the shared header limit and what message_queue.idempotency_key holds.
dbTest("an Idempotency-Key header may have 256 characters, not 257", async () => {
  const token = await serviceToken();
  const send = (key: string) =>
    call(app, "POST", "/queues/long-keys/messages", {
      token,
      headers: { "idempotency-key": key },
      body: { payload: {} },
    });
  expectError(await send("k".repeat(257)), 400, "invalid_idempotency_key");
  assert.equal(await count("long-keys"), 0);
  const res = await send("k".repeat(256));
  assert.equal(res.status, 201, JSON.stringify(res.body));
  assert.equal(await count("long-keys"), 1);
});

dbTest("100 concurrent sends with one idempotency key make one message", async () => {
  const token = await serviceToken();
  const viaHttp = await Promise.all(
    Array.from({ length: 50 }, () =>
      call(app, "POST", "/queues/race/messages", {
        token,
        body: { payload: { x: 1 }, idempotency_key: "same" },
      })),
  );
  const clients = await Promise.all(Array.from({ length: 10 }, consumer));
  try {
    const viaSql = await Promise.all(
      Array.from({ length: 50 }, (_, i) =>
        clients[
          i % 10
        ]`select id from public.send_message('race', '{"x": 1}', p_idempotency_key := 'same')`),
    );
    const ids = new Set([
      ...viaHttp.map((r) => r.body.message.id),
      ...viaSql.map(([r]) => String(r.id)),
    ]);
    assert.equal(ids.size, 1);
    // The HTTP sends ran first: one of them created the message, the rest found it.
    assert.deepEqual(
      viaHttp.map((r) => r.status).sort((a, b) => a - b),
      [...Array(49).fill(200), 201],
    );
  } finally {
    await Promise.all(clients.map((c) => c.end()));
  }
  assert.equal(await count("race"), 1);
});

/** The lines a child process prints on stdout, as they come. */
async function* lines(stream: ReadableStream<Uint8Array>): AsyncGenerator<string> {
  let text = "";
  for await (const chunk of stream.pipeThrough(new TextDecoderStream())) {
    text += chunk;
    const done = text.split("\n");
    text = done.pop()!;
    yield* done;
  }
}

dbTest(
  "4 consumers drain 10,000 messages; one killed mid-batch: its batch comes back after its lease",
  async () => {
    const total = 10_000;
    const lease = 4; // the killed consumer's second batch, in seconds
    const setup = await consumer();
    try {
      for (let i = 0; i < total; i += 1000) {
        const batch = Array.from({ length: 1000 }, (_, j) => ({ payload: { n: i + j } }));
        await setup`select count(*) from public.send_messages('bulk', ${setup.json(batch)})`;
      }
    } finally {
      await setup.end();
    }

    // Consumer 4 is a process of its own; it acks its first batch, half its
    // second, and is SIGKILLed there while the other three drain the queue
    // (they start once it holds both its batches, so that it finds messages).
    const child = new Deno.Command(Deno.execPath(), {
      args: [
        ...["run", "-A", new URL("../support/run_queue_consumer.ts", import.meta.url).pathname],
        ...[db.url, "bulk", String(lease)],
      ],
      stdout: "piped",
      stderr: "null",
    }).spawn();
    const childAcked = new Set<string>();
    let held: string[] = [];
    let leaseEnds = Infinity; // epoch ms: the killed consumer's lease runs out no earlier
    let killed = false;
    const output = lines(child.stdout);

    const processedBy = new Map<string, string[]>();
    const claimedAt = new Map<string, number>();
    let started = performance.now();
    const workers: postgres.Sql[] = [];
    try {
      assert.equal((await output.next()).value, "claimed");
      started = performance.now();
      workers.push(...await Promise.all(Array.from({ length: 3 }, consumer)));
      const kill = (async () => {
        const report = JSON.parse((await output.next()).value ?? "null");
        child.kill("SIGKILL");
        const status = await child.status;
        assert.equal(status.signal, "SIGKILL");
        report.acked.forEach((id: string) => childAcked.add(id));
        held = report.held;
        leaseEnds = report.claimedAfter + lease * 1000;
        killed = true;
      })();
      await Promise.all([
        kill,
        ...workers.map(async (sql, w) => {
          while (
            !(killed && processedBy.size + childAcked.size >= total) &&
            performance.now() - started < 20_000
          ) {
            const rows =
              await sql`select id, lease_token from public.claim_messages('bulk', 100, 30, ${`w${w}`})`;
            const at = Date.now();
            if (rows.length === 0) {
              await sleep(50);
              continue;
            }
            for (const r of rows) {
              const id = String(r.id);
              processedBy.set(id, [...(processedBy.get(id) ?? []), `w${w}`]);
              claimedAt.set(id, at);
            }
            const acked = await sql`select id from public.ack_messages('bulk',
              ${rows.map((r) => r.id)}::bigint[], ${rows.map((r) => r.lease_token)}::uuid[])`;
            assert.equal(acked.length, rows.length);
          }
        }),
      ]);
    } finally {
      await Promise.all(workers.map((c) => c.end()));
      try {
        child.kill("SIGKILL"); // if an assertion ended the test before the kill did
      } catch { /* it has been killed, or exited, already */ }
    }
    const elapsed = performance.now() - started;

    assert.equal(childAcked.size, 150, "the killed consumer acked a batch and a half");
    assert.equal(held.length, 50, "and held half a batch when it died");
    assert.equal(processedBy.size + childAcked.size, total, "every message processed");
    for (const [id, by] of processedBy) {
      assert.equal(by.length, 1, `message ${id} claimed by ${by}`);
      assert.ok(!childAcked.has(id), `message ${id} came back after the killed consumer acked it`);
    }
    for (const id of held) {
      assert.ok(processedBy.has(id), `held message ${id} came back`);
      assert.ok(
        claimedAt.get(id)! >= leaseEnds,
        `held message ${id} claimed before the lease ran out`,
      );
    }
    const [stats] = await db.sql`
      select count(*) filter (where status = 'completed')::int as completed,
             count(*) filter (where attempts = 2)::int as second_attempts
      from public.message_queue where queue_name = 'bulk'`;
    assert.deepEqual({ ...stats }, { completed: total, second_attempts: 50 });
    assert.ok(elapsed < 15_000, `took ${Math.round(elapsed)} ms`);
  },
);

dbTest("claim, ack and nack over HTTP: backoff, dead letters, lease expiry, metrics", async () => {
  const token = await serviceToken();
  const sent = await call(app, "POST", "/queues/work/messages", {
    token,
    body: { messages: [{ payload: { a: 1 }, max_attempts: 2 }, { payload: { b: 2 } }] },
  });
  assert.equal(sent.status, 201);
  const claimed = await call(app, "POST", "/queues/work/claim", {
    token,
    body: { limit: 10, visibility_timeout_seconds: 1, consumer: "http" },
  });
  assert.equal(claimed.body.messages.length, 2);
  const [a, b] = claimed.body.messages;

  const acked = await call(app, "POST", `/queues/work/messages/${b.id}/ack`, {
    token,
    body: { lease_token: b.lease_token },
  });
  assert.equal(acked.body.message.status, "completed");
  expectError(
    await call(app, "POST", `/queues/work/messages/${b.id}/ack`, {
      token,
      body: { lease_token: b.lease_token },
    }),
    409,
    "lease_lost",
  );

  const nacked = await call(app, "POST", `/queues/work/messages/${a.id}/nack`, {
    token,
    body: { lease_token: a.lease_token, error: "smtp down" },
  });
  assert.equal(nacked.body.message.status, "pending");
  const wait = Date.parse(nacked.body.message.visible_at) - Date.now();
  assert.ok(wait > 1000 && wait < 3000, `backoff ${wait} ms`);
  await db.sql`update public.message_queue set visible_at = now() where id = ${a.id}`;

  // second attempt: the consumer dies; after the 1 s lease it is the last attempt used up
  const again = await call(app, "POST", "/queues/work/claim", {
    token,
    body: { visibility_timeout_seconds: 1 },
  });
  assert.equal(again.body.messages[0].attempts, 2);
  assert.equal(
    (await call(app, "POST", "/queues/work/claim", { token, body: {} })).body.messages.length,
    0,
  );
  await sleep(1100);
  const afterLease = await call(app, "POST", "/queues/work/claim", { token, body: {} });
  assert.equal(
    afterLease.body.messages.length,
    0,
    "no attempts left: dead-lettered, not redelivered",
  );

  const metrics = await call(app, "GET", "/queues/work/metrics", { token });
  assert.equal(metrics.status, 200);
  assert.equal(metrics.body.dead, 1);
  assert.equal(metrics.body.completed, 1);
  assert.equal(metrics.body.depth, 0);
  assert.equal(metrics.body.in_flight, 0);

  // once the cause is fixed, the dead letter is redriven and delivered again
  const redriven = await call(app, "POST", `/queues/work/messages/${a.id}/redrive`, { token });
  assert.equal(redriven.status, 200, JSON.stringify(redriven.body));
  assert.deepEqual([redriven.body.message.status, redriven.body.message.attempts], ["pending", 0]);
  const redelivered = await call(app, "POST", "/queues/work/claim", { token, body: {} });
  assert.deepEqual(redelivered.body.messages.map((m: { id: string }) => m.id), [a.id]);
});

dbTest("a path that only starts like an action is 404 and settles nothing", async () => {
  const token = await serviceToken();
  await call(app, "POST", "/queues/paths/messages", { token, body: { payload: { a: 1 } } });
  const claimed = await call(app, "POST", "/queues/paths/claim", { token, body: { limit: 1 } });
  const [m] = claimed.body.messages;
  for (
    const action of ["acknowledge", "ack/x", "nackx", "archive-all", "archive/undo", "redrivex"]
  ) {
    expectError(
      await call(app, "POST", `/queues/paths/messages/${m.id}/${action}`, {
        token,
        body: { lease_token: m.lease_token },
      }),
      404,
      "not_found",
    );
  }
  const [row] = await db.sql`select status from public.message_queue where id = ${m.id}`;
  assert.equal(row.status, "processing");
});

dbTest("an expired lease makes a message visible again", async () => {
  const token = await serviceToken();
  await call(app, "POST", "/queues/lease/messages", { token, body: { payload: { x: 1 } } });
  const first = await call(app, "POST", "/queues/lease/claim", {
    token,
    body: { visibility_timeout_seconds: 1 },
  });
  assert.equal(first.body.messages.length, 1);
  assert.equal(
    (await call(app, "POST", "/queues/lease/claim", { token, body: {} })).body.messages.length,
    0,
  );
  await sleep(1100);
  const second = await call(app, "POST", "/queues/lease/claim", { token, body: {} });
  assert.equal(second.body.messages[0].id, first.body.messages[0].id);
  expectError(
    await call(app, "POST", `/queues/lease/messages/${first.body.messages[0].id}/ack`, {
      token,
      body: { lease_token: first.body.messages[0].lease_token },
    }),
    409,
    "lease_lost",
  );
});

dbTest("bad input gets 400 and changes nothing", async () => {
  const token = await serviceToken();
  const before = await count("valid");
  expectError(
    await call(app, "POST", "/queues/Bad!Queue/messages", { token, body: { payload: {} } }),
    400,
    "invalid_request",
  );
  expectError(
    await call(app, "POST", "/queues/valid/messages", { token, body: { payload: [1] } }),
    400,
    "invalid_request",
  );
  const negative = expectError(
    await call(app, "POST", "/queues/valid/messages", {
      token,
      body: { payload: {}, priority: -1 },
    }),
    400,
    "invalid_request",
  );
  assert.deepEqual((negative.details as { path: string }[]).map((d) => d.path), ["priority"]);
  const inBatch = expectError(
    await call(app, "POST", "/queues/valid/messages", {
      token,
      body: { messages: [{ payload: {} }, { payload: 1 }] },
    }),
    400,
    "invalid_request",
  );
  assert.deepEqual((inBatch.details as { path: string }[]).map((d) => d.path), [
    "messages.1.payload",
  ]);
  expectError(
    await call(app, "POST", "/queues/valid/claim", { token, body: { limit: 0 } }),
    400,
    "invalid_request",
  );
  expectError(await call(app, "GET", "/queues/UPPER/metrics", { token }), 400, "invalid_request");
  const keyed = expectError(
    await call(app, "POST", "/queues/valid/messages", {
      token,
      body: { messages: [{ payload: {} }] },
      headers: { "idempotency-key": "batch-key" },
    }),
    400,
  );
  assert.equal(keyed.code, "idempotency_key_on_batch");
  // a route whose last segment is one of a set still answers 405 to another method
  const wrongMethod = await call(app, "GET", "/queues/valid/messages/1/ack", { token });
  expectError(wrongMethod, 405, "method_not_allowed");
  assert.equal(wrongMethod.headers.get("allow"), "POST, OPTIONS");
  assert.equal(await count("valid"), before);
  const [row] = await db
    .sql`select count(*)::int as n from public.message_queue where queue_name !~ '^[a-z]'`;
  assert.equal(row.n, 0);
});

dbTest("users send as themselves and cannot consume; anon can do nothing", async () => {
  const alice = await createUser(db);
  const bob = await createUser(db);
  const aliceToken = await userToken(alice);
  const closed = expectError(
    await call(app, "POST", "/queues/uploads/messages", {
      token: aliceToken,
      body: { payload: { file: "a.png" } },
    }),
    403,
  );
  assert.equal(closed.code, "queue_not_open", "a queue is closed to users until it is listed");
  await db.sql`insert into private.user_queues (queue_name) values ('uploads')`;
  expectError(
    await call(app, "POST", "/queues/uploads/messages", {
      token: aliceToken,
      body: { payload: { file: "a.png" }, priority: 1 },
    }),
    403,
    "priority_not_allowed",
  );
  const sent = await call(app, "POST", "/queues/uploads/messages", {
    token: aliceToken,
    headers: { "idempotency-key": "upload-1" },
    body: { payload: { file: "a.png" } },
  });
  assert.equal(sent.status, 201);
  assert.equal(sent.body.message.user_id, alice);
  const bobs = await call(app, "POST", "/queues/uploads/messages", {
    token: await userToken(bob),
    headers: { "idempotency-key": "upload-1" },
    body: { payload: { file: "a.png" } },
  });
  assert.equal(bobs.status, 201, "another user's key does not return alice's message");
  assert.notEqual(bobs.body.message.id, sent.body.message.id);
  expectError(
    await call(app, "POST", "/queues/uploads/claim", { token: aliceToken, body: {} }),
    403,
  );
  expectError(await call(app, "GET", "/queues/uploads/metrics", { token: aliceToken }), 403);
  expectError(
    await call(app, "POST", `/queues/uploads/messages/${sent.body.message.id}/ack`, {
      token: aliceToken,
      body: { lease_token: crypto.randomUUID() },
    }),
    403,
  );
  const anon = await anonToken();
  expectError(
    await call(app, "POST", "/queues/uploads/messages", { token: anon, body: { payload: {} } }),
    401,
  );
  expectError(await call(app, "POST", "/queues/uploads/claim", { token: anon, body: {} }), 401);
  expectError(await call(app, "GET", "/queues/uploads/metrics", { token: anon }), 401);
});

dbTest("a claim with wait_seconds waits for a message sent meanwhile", async () => {
  const token = await serviceToken();
  const started = performance.now();
  const waiting = call(app, "POST", "/queues/long-poll/claim", {
    token,
    body: { wait_seconds: 5, poll_interval_ms: 50 },
  });
  await sleep(400);
  await call(app, "POST", "/queues/long-poll/messages", { token, body: { payload: { late: 1 } } });
  const claimed = await waiting;
  const elapsed = performance.now() - started;
  assert.equal(claimed.status, 200, JSON.stringify(claimed.body));
  assert.deepEqual(claimed.body.messages.map((m: { payload: unknown }) => m.payload), [{
    late: 1,
  }]);
  assert.equal(claimed.body.messages[0].status, "processing");
  assert.ok(elapsed >= 400 && elapsed < 3000, `answered after ${Math.round(elapsed)} ms`);

  const emptyStart = performance.now();
  const empty = await call(app, "POST", "/queues/long-poll/claim", {
    token,
    body: { wait_seconds: 0.6, poll_interval_ms: 100 },
  });
  const waited = performance.now() - emptyStart;
  assert.deepEqual(empty.body, { messages: [] });
  assert.ok(waited >= 550 && waited < 2000, `an empty long poll took ${Math.round(waited)} ms`);

  for (const body of [{ wait_seconds: 21 }, { wait_seconds: -1 }, { poll_interval_ms: 10 }]) {
    expectError(
      await call(app, "POST", "/queues/long-poll/claim", { token, body }),
      400,
      "invalid_request",
    );
  }
});

/** A long-poll claim whose client can leave: abort `gone` to drop the request. */
function claimToAbort(queue: string, token: string, body: Record<string, unknown>) {
  const gone = new AbortController();
  const waiting = Promise.resolve(app.request(`/queues/${queue}/claim`, {
    method: "POST",
    headers: { authorization: `Bearer ${token}`, "content-type": "application/json" },
    body: JSON.stringify(body),
    signal: gone.signal,
  }));
  return { gone, waiting };
}

dbTest("a long poll whose client has gone leases nothing", async () => {
  const token = await serviceToken();
  const { gone, waiting } = claimToAbort("abandoned", token, {
    wait_seconds: 2,
    poll_interval_ms: 300,
  });
  await sleep(100);
  gone.abort();
  await call(app, "POST", "/queues/abandoned/messages", { token, body: { payload: {} } });
  await waiting.catch(() => undefined);
  await sleep(500);
  const [row] = await db.sql`select status, attempts from public.message_queue
                             where queue_name = 'abandoned'`;
  assert.deepEqual({ ...row }, { status: "pending", attempts: 0 });
});

dbTest("a long poll whose client leaves during a claim hands the messages back", async () => {
  const token = await serviceToken();
  await call(app, "POST", "/queues/left/messages", { token, body: { payload: {} } });
  // the claim waits on this lock until after the client has gone
  let unlock: () => void = () => {};
  const unlocked = new Promise<void>((r) => (unlock = r));
  let locked: () => void = () => {};
  const isLocked = new Promise<void>((r) => (locked = r));
  const locker = db.sql.begin(async (tx) => {
    await tx`lock table public.message_queue in exclusive mode`;
    locked();
    await unlocked;
  });
  await isLocked;
  const { gone, waiting } = claimToAbort("left", token, {
    wait_seconds: 5,
    visibility_timeout_seconds: 300,
  });
  await sleep(200);
  gone.abort();
  unlock();
  await locker;
  const res = await waiting.catch(() => undefined);
  if (res) assert.deepEqual(await res.json(), { messages: [] });
  const [row] = await db.sql`select status, attempts, lease_token from public.message_queue
                             where queue_name = 'left'`;
  assert.deepEqual({ ...row }, { status: "pending", attempts: 0, lease_token: null });
});

dbTest("pop, archive and delete over HTTP, and every queue's metrics", async () => {
  const token = await serviceToken();
  const sent = await call(app, "POST", "/queues/ops/messages", {
    token,
    body: {
      messages: [
        { payload: { n: 1 } },
        { payload: { n: 2 }, priority: 7 },
        { payload: { n: 3 }, delay_seconds: 3600 },
        { payload: { n: 4 }, headers: { source: "app", trace: null } },
      ],
    },
  });
  assert.equal(sent.status, 201);
  assert.deepEqual(sent.body.messages[3].headers, { source: "app", trace: null });
  assert.equal(sent.body.messages[0].headers, null);
  expectError(
    await call(app, "POST", "/queues/ops/messages", { token, body: { payload: {}, headers: [] } }),
    400,
    "invalid_request",
  );
  const [, , delayed, fourth] = sent.body.messages;

  const popped = await call(app, "POST", "/queues/ops/pop", { token, body: { limit: 2 } });
  assert.equal(popped.status, 200, JSON.stringify(popped.body));
  assert.deepEqual(
    popped.body.messages.map((m: { payload: unknown; status: string }) => [m.payload, m.status]),
    [[{ n: 2 }, "completed"], [{ n: 1 }, "completed"]],
  );

  const archived = await call(app, "POST", `/queues/ops/messages/${delayed.id}/archive`, { token });
  assert.equal(archived.status, 200, JSON.stringify(archived.body));
  assert.equal(archived.body.message.status, "completed");
  expectError(
    await call(app, "POST", `/queues/ops/messages/${delayed.id}/archive`, { token }),
    409,
    "message_finished",
  );
  expectError(
    await call(app, "POST", `/queues/other/messages/${fourth.id}/archive`, { token }),
    404,
    "message_not_found",
  );
  expectError(
    await call(app, "POST", "/queues/ops/messages/abc/archive", { token }),
    400,
    "invalid_request",
  );
  expectError(
    await call(app, "POST", `/queues/ops/messages/${delayed.id}/redrive`, { token }),
    409,
    "message_not_dead",
  );

  expectError(
    await call(app, "DELETE", `/queues/other/messages/${fourth.id}`, { token }),
    404,
    "message_not_found",
  );
  const deleted = await call(app, "DELETE", `/queues/ops/messages/${fourth.id}`, { token });
  assert.deepEqual(deleted.body, { id: fourth.id });
  expectError(
    await call(app, "DELETE", `/queues/ops/messages/${fourth.id}`, { token }),
    404,
    "message_not_found",
  );

  const all = await call(app, "GET", "/queues", { token });
  assert.equal(all.status, 200);
  const ops = all.body.queues.find((q: { queue_name: string }) => q.queue_name === "ops");
  assert.deepEqual(
    [ops.depth, ops.delayed, ops.in_flight, ops.dead, ops.completed, ops.total],
    [0, 0, 0, 0, 3, 3],
  );
  const names = all.body.queues.map((q: { queue_name: string }) => q.queue_name);
  assert.deepEqual(names, [...names].sort(), "by name");

  // only the service role operates on messages by id or lists the queues
  const user = await userToken(await createUser(db));
  const anon = await anonToken();
  const before = await db.sql`select id, status from public.message_queue order by id`;
  for (const who of [user, anon]) {
    const status = who === user ? 403 : 401;
    expectError(await call(app, "POST", "/queues/ops/pop", { token: who, body: {} }), status);
    expectError(
      await call(app, "POST", `/queues/ops/messages/${delayed.id}/archive`, { token: who }),
      status,
    );
    expectError(
      await call(app, "DELETE", `/queues/ops/messages/${delayed.id}`, { token: who }),
      status,
    );
    expectError(
      await call(app, "POST", `/queues/ops/messages/${delayed.id}/redrive`, { token: who }),
      status,
    );
    expectError(await call(app, "GET", "/queues", { token: who }), status);
  }
  assert.deepEqual(await db.sql`select id, status from public.message_queue order by id`, before);
});

dbTest(
  "FIFO groups: sends racing 4 consumers, each group one at a time in send order",
  async () => {
    const token = await serviceToken();
    const GROUPS = 8;
    const PER_GROUP = 25;
    const total = GROUPS * PER_GROUP;
    const seen: number[][] = Array.from({ length: GROUPS }, () => []);
    const inFlight = new Array(GROUPS).fill(0);
    let mostInFlight = 0;
    let done = 0;

    // each group's messages are sent one request at a time, all groups at once
    const senders = Array.from({ length: GROUPS }, async (_, g) => {
      for (let n = 0; n < PER_GROUP; n++) {
        const res = await call(app, "POST", "/queues/fifo/messages", {
          token,
          body: { payload: { g, n }, group_key: `group-${g}` },
        });
        assert.equal(res.status, 201, JSON.stringify(res.body));
        if (n % 5 === 0) await sleep(Math.random() * 10);
      }
    });
    const deadline = Date.now() + 30_000;
    const consumers = Array.from({ length: 4 }, async () => {
      while (done < total && Date.now() < deadline) {
        const claimed = await call(app, "POST", "/queues/fifo/claim", {
          token,
          body: { limit: 4, visibility_timeout_seconds: 30 },
        });
        assert.equal(claimed.status, 200, JSON.stringify(claimed.body));
        if (claimed.body.messages.length === 0) {
          await sleep(10);
          continue;
        }
        for (const m of claimed.body.messages) {
          const { g, n } = m.payload;
          inFlight[g]++;
          mostInFlight = Math.max(mostInFlight, inFlight[g]);
          seen[g].push(n);
          await sleep(Math.random() * 3);
          inFlight[g]--;
          const acked = await call(app, "POST", `/queues/fifo/messages/${m.id}/ack`, {
            token,
            body: { lease_token: m.lease_token },
          });
          assert.equal(acked.status, 200, JSON.stringify(acked.body));
          done++;
        }
      }
    });
    await Promise.all([...senders, ...consumers]);

    assert.equal(done, total);
    assert.equal(mostInFlight, 1, "never two messages of a group in flight");
    const inOrder = Array.from({ length: PER_GROUP }, (_, n) => n);
    for (const order of seen) assert.deepEqual(order, inOrder);
    const left = await db.sql`select status, count(*)::int as n from public.message_queue
                            where queue_name = 'fifo' group by status`;
    assert.deepEqual(left.map((r) => ({ ...r })), [{ status: "completed", n: total }]);
  },
);

// Whichever of the two commits second must promote the message the other
// left blocked: the first holds its transaction open while the second runs.
dbTest("FIFO groups: a send racing the ack of its group's head never stays blocked", async () => {
  for (const first of ["ack", "send"] as const) {
    const queue = `fifo-race-${first}`;
    const a = await consumer();
    const b = await consumer();
    try {
      await a`select public.send_message(${queue}, '{"n": 1}', p_group_key := 'g')`;
      const [head] = await a`select id, lease_token from public.claim_messages(${queue}, 1, 30)`;
      const ack = (sql: postgres.TransactionSql | postgres.Sql) =>
        sql`select public.ack_message(${queue}, ${head.id}, ${head.lease_token})`;
      const send = (sql: postgres.TransactionSql | postgres.Sql) =>
        sql`select public.send_message(${queue}, '{"n": 2}', p_group_key := 'g')`;
      let release!: () => void;
      const held = new Promise<void>((resolve) => (release = resolve));
      const firstTx = a.begin(async (tx) => {
        await (first === "ack" ? ack(tx) : send(tx));
        await held;
      });
      await sleep(100);
      // postgres.js queries start when awaited or executed: this one starts now
      const second = (first === "ack" ? send(b) : ack(b)).execute();
      await sleep(100);
      release();
      await firstTx;
      await second;
      const rows = await db.sql`select payload ->> 'n' as n, status from public.message_queue
                                where queue_name = ${queue} order by id`;
      assert.deepEqual(rows.map((r) => ({ ...r })), [
        { n: "1", status: "completed" },
        { n: "2", status: "pending" },
      ], `${first} first`);
    } finally {
      await a.end();
      await b.end();
    }
  }
});

/** A gate: `open` lets whoever awaits `opened` go on. */
function gate(): { opened: Promise<void>; open: () => void } {
  let open!: () => void;
  const opened = new Promise<void>((resolve) => (open = resolve));
  return { opened, open };
}

const groupStates = async (queue: string) =>
  (await db.sql`select payload ->> 'n' as n, status from public.message_queue
                where queue_name = ${queue} order by id`).map((r) => `${r.n}:${r.status}`);

// A purge promotes the groups of the heads its delete removed, even ones
// committed after it started: a send holds its group open while a table lock
// queued behind it holds the purge's delete back until the send is in.
dbTest("FIFO groups: a purge racing a send leaves the group a head", async () => {
  const sendIn = gate();
  const commitSend = gate();
  const send = db.sql.begin(async (tx) => {
    await tx`select public.send_messages('purge-race', '[{"payload": {"n": 1}, "group_key": "g"},
               {"payload": {"n": 2}, "group_key": "g"}]')`;
    sendIn.open();
    await commitSend.opened;
  });
  await sendIn.opened;
  const lockHeld = gate();
  const locker = db.sql.begin(async (tx) => {
    await tx`lock table public.message_queue in share mode`;
    await lockHeld.opened;
  });
  await sleep(100);
  const purge = db.sql`select public.purge_queue('purge-race', 'pending') as n`.execute();
  await sleep(100);
  commitSend.open();
  await send;
  lockHeld.open();
  await locker;
  const [{ n }] = await purge;
  assert.equal(Number(n), 1, "the purge deleted the head sent meanwhile");
  assert.deepEqual(await groupStates("purge-race"), ["2:pending"]);
});

// The promotion locks the blocked message it picks: one deleted meanwhile is
// passed over for the next, not left as the group's only (blocked) message.
dbTest("FIFO groups: a promotion passes over a blocked message deleted under it", async () => {
  await db.sql`select public.send_messages('skip-race', '[{"payload": {"n": 1}, "group_key": "g"},
                 {"payload": {"n": 2}, "group_key": "g"}]')`;
  const [head] = await db
    .sql`select id, lease_token from public.claim_messages('skip-race', 1, 30)`;
  const purged = gate();
  const commitPurge = gate();
  const purge = db.sql.begin(async (tx) => {
    await tx`select public.purge_queue('skip-race', 'blocked')`;
    purged.open();
    await commitPurge.opened;
  });
  await purged.opened;
  await db.sql`select public.send_message('skip-race', '{"n": 3}', p_group_key := 'g')`;
  const ack = db.sql`select public.ack_message('skip-race', ${head.id}, ${head.lease_token})`
    .execute();
  await sleep(100);
  commitPurge.open();
  await purge;
  await ack;
  assert.deepEqual(await groupStates("skip-race"), ["1:completed", "3:pending"]);
});

dbTest("FIFO groups need READ COMMITTED", async () => {
  const err = await db.sql.begin(
    "isolation level repeatable read",
    (tx) => tx`select public.send_message('rr', '{}', p_group_key := 'g')`,
  ).catch((e) => e);
  assert.equal(err.code, "PT400");
  assert.match(err.message, /read_committed_required|READ COMMITTED/);
  assert.equal(await count("rr"), 0);
});

dbTest("a claim with a filter takes only messages whose payload contains it", async () => {
  const token = await serviceToken();
  const sent = await call(app, "POST", "/queues/filtered/messages", {
    token,
    body: {
      messages: [
        { payload: { kind: "email", to: "a@example.com" } },
        { payload: { kind: "sms", to: "+250788000001" } },
        { payload: { kind: "sms", to: "+250788000002", meta: { region: "kigali" } }, priority: 3 },
        { payload: { kind: "sms", to: "+250788000003" }, delay_seconds: 3600 },
      ],
    },
  });
  assert.equal(sent.status, 201, JSON.stringify(sent.body));
  const payloads = (r: { body: { messages: { payload: Record<string, unknown> }[] } }) =>
    r.body.messages.map((m) => m.payload.to);

  const nested = await call(app, "POST", "/queues/filtered/claim", {
    token,
    body: { filter: { meta: { region: "kigali" } } },
  });
  assert.equal(nested.status, 200, JSON.stringify(nested.body));
  assert.deepEqual(payloads(nested), ["+250788000002"]);
  const sms = await call(app, "POST", "/queues/filtered/claim", {
    token,
    body: { limit: 10, filter: { kind: "sms" } },
  });
  assert.deepEqual(payloads(sms), ["+250788000001"], "the due sms only, not the delayed one");
  const none = await call(app, "POST", "/queues/filtered/claim", {
    token,
    body: { filter: { kind: "push" } },
  });
  assert.deepEqual(none.body, { messages: [] });

  // bad filters are 400 and claim nothing
  const state = () =>
    db.sql`select id, status, attempts from public.message_queue
           where queue_name = 'filtered' order by id`;
  const before = await state();
  for (const filter of [["sms"], "sms", null, 5]) {
    expectError(
      await call(app, "POST", "/queues/filtered/claim", { token, body: { filter } }),
      400,
      "invalid_request",
    );
  }
  assert.deepEqual(await state(), before);
  assert.ok(before.some((r) => r.status === "pending" && r.attempts === 0), "one was claimable");

  // a long poll's claims all take the filter: an email sent meanwhile is left
  const waiting = call(app, "POST", "/queues/filtered/claim", {
    token,
    body: { wait_seconds: 5, poll_interval_ms: 50, filter: { kind: "sms" } },
  });
  await sleep(200);
  await call(app, "POST", "/queues/filtered/messages", {
    token,
    body: { payload: { kind: "email", to: "b@example.com" } },
  });
  await sleep(300);
  await call(app, "POST", "/queues/filtered/messages", {
    token,
    body: { payload: { kind: "sms", to: "+250788000004" } },
  });
  const polled = await waiting;
  assert.equal(polled.status, 200, JSON.stringify(polled.body));
  assert.deepEqual(payloads(polled), ["+250788000004"]);
  const [left] = await db.sql`select count(*)::int as n from public.message_queue
    where queue_name = 'filtered' and status = 'pending' and payload ->> 'kind' = 'email'`;
  assert.equal(left.n, 2, "the emails are still pending");

  // an empty filter claims every message
  const all = await call(app, "POST", "/queues/filtered/claim", {
    token,
    body: { limit: 10, filter: {} },
  });
  assert.deepEqual(payloads(all), ["a@example.com", "b@example.com"]);

  const user = await userToken(await createUser(db));
  expectError(
    await call(app, "POST", "/queues/filtered/claim", { token: user, body: { filter: {} } }),
    403,
  );
  expectError(
    await call(app, "POST", "/queues/filtered/claim", {
      token: await anonToken(),
      body: { filter: {} },
    }),
    401,
  );
});

dbTest("set_vt over HTTP: a message visible when an operator says, whoever holds it", async () => {
  const token = await serviceToken();
  const sent = await call(app, "POST", "/queues/vt/messages", {
    token,
    body: {
      messages: [
        { payload: { n: 1 }, delay_seconds: 3600 },
        { payload: { n: 2 } },
        { payload: { n: 3 } },
      ],
    },
  });
  assert.equal(sent.status, 201, JSON.stringify(sent.body));
  const [delayed, second, third] = sent.body.messages;
  const setVt = (id: string, body: unknown, who = token, queue = "vt") =>
    call(app, "POST", `/queues/${queue}/messages/${id}/visibility`, { token: who, body });

  const now = await setVt(delayed.id, { visible_in_seconds: 0 });
  assert.equal(now.status, 200, JSON.stringify(now.body));
  assert.equal(now.body.message.status, "pending");
  assert.ok(Date.parse(now.body.message.visible_at) <= Date.now() + 1000);
  const later = await setVt(second.id, { visible_in_seconds: 600 });
  const wait = Date.parse(later.body.message.visible_at) - Date.now();
  assert.ok(wait > 590_000 && wait < 610_000, `re-timed to ${wait} ms from now`);

  const claimed = await call(app, "POST", "/queues/vt/claim", {
    token,
    body: { limit: 10, visibility_timeout_seconds: 60 },
  });
  assert.deepEqual(
    claimed.body.messages.map((m: { id: string }) => m.id),
    [delayed.id, third.id],
    "the delayed message is due now; the re-timed one is not",
  );
  const held = claimed.body.messages.find((m: { id: string }) => m.id === third.id);

  // in flight: the lease ends then; the next claim takes the message again
  const ended = await setVt(third.id, { visible_in_seconds: 0 });
  assert.equal(ended.body.message.status, "processing");
  assert.equal(ended.body.message.lease_token, held.lease_token);
  const again = await call(app, "POST", "/queues/vt/claim", { token, body: {} });
  assert.deepEqual(
    again.body.messages.map((m: { id: string; attempts: number }) => [m.id, m.attempts]),
    [[third.id, 2]],
  );
  expectError(
    await call(app, "POST", `/queues/vt/messages/${third.id}/ack`, {
      token,
      body: { lease_token: held.lease_token },
    }),
    409,
    "lease_lost",
  );
  const acked = await call(app, "POST", `/queues/vt/messages/${third.id}/ack`, {
    token,
    body: { lease_token: again.body.messages[0].lease_token },
  });
  assert.equal(acked.body.message.status, "completed");
  expectError(await setVt(third.id, { visible_in_seconds: 0 }), 409, "message_finished");
  expectError(
    await setVt(second.id, { visible_in_seconds: 0 }, token, "other"),
    404,
    "message_not_found",
  );
  expectError(await setVt("999999999", { visible_in_seconds: 0 }), 404, "message_not_found");

  // bad input, other users and anon change nothing
  const state = () =>
    db.sql`select id, status, visible_at, updated_at from public.message_queue
           where queue_name = 'vt' order by id`;
  const before = await state();
  for (
    const body of [
      {},
      { visible_in_seconds: -1 },
      { visible_in_seconds: 31536001 },
      { visible_in_seconds: "0" },
      { visible_in_seconds: null },
      { visible_in_seconds: 0, lease_token: crypto.randomUUID() },
    ]
  ) {
    expectError(await setVt(second.id, body), 400, "invalid_request");
  }
  expectError(await setVt("abc", { visible_in_seconds: 0 }), 400, "invalid_request");
  expectError(
    await setVt(second.id, { visible_in_seconds: 0 }, token, "Bad"),
    400,
    "invalid_request",
  );
  const alice = await createUser(db);
  await db.sql`insert into private.user_queues (queue_name) values ('vt')`;
  const aliceToken = await userToken(alice);
  const hers = await call(app, "POST", "/queues/vt/messages", {
    token: aliceToken,
    body: { payload: { n: 4 }, delay_seconds: 3600 },
  });
  assert.equal(hers.status, 201);
  const withHers = await state();
  expectError(await setVt(hers.body.message.id, { visible_in_seconds: 0 }, aliceToken), 403);
  expectError(await setVt(second.id, { visible_in_seconds: 0 }, aliceToken), 403);
  expectError(await setVt(second.id, { visible_in_seconds: 0 }, await anonToken()), 401);
  assert.deepEqual(await state(), withHers);
  assert.deepEqual(withHers.filter((r) => r.id !== hers.body.message.id), [...before]);
});

dbTest("metrics count every message a queue was sent, as pgmq's total_messages", async () => {
  const token = await serviceToken();
  const sent = await call(app, "POST", "/queues/counted/messages", {
    token,
    body: { messages: [{ payload: {} }, { payload: {} }, { payload: {} }] },
  });
  assert.equal(sent.status, 201);
  await call(app, "DELETE", `/queues/counted/messages/${sent.body.messages[0].id}`, { token });
  await call(app, "POST", "/queues/counted/pop", { token, body: {} });
  await db.sql`select public.purge_queue('counted', 'completed')`;
  const metrics = await call(app, "GET", "/queues/counted/metrics", { token });
  assert.equal(metrics.status, 200);
  assert.deepEqual([metrics.body.total, metrics.body.total_messages], [1, 3]);
  const all = await call(app, "GET", "/queues", { token });
  const counted = all.body.queues.find((q: { queue_name: string }) => q.queue_name === "counted");
  assert.deepEqual([counted.total, counted.total_messages], [1, 3]);
});

// Messages whose time came while no claim looked wait in the delayed index.
// Claims marked them due first and held the marks locked until they
// committed: a claim marked a thousand of them and took one, and a claim
// beside it, before the first committed, found none of the other 49 and
// answered empty (a worker's slot stops there). A claim now takes them as
// they are, locking only what it takes; the one beside it takes the next.
dbTest("a claim beside one that takes fallen-due messages takes the next of them", async () => {
  const queue = "fallen-due";
  await db.sql`insert into public.message_queue (queue_name, payload, visible_at)
               select ${queue}, jsonb_build_object('n', i), now() - interval '1 minute' + i * interval '1 ms'
               from generate_series(1, 50) i`;
  const a = await consumer();
  const b = await consumer();
  try {
    let release!: () => void;
    const held = new Promise<void>((resolve) => (release = resolve));
    let first: unknown;
    const firstTx = a.begin(async (tx) => {
      first = (await tx`select payload ->> 'n' as n from public.claim_messages(${queue}, 1, 30)`)
        .map((r) => r.n);
      await held;
    });
    while (first === undefined) await sleep(10);
    const beside = await b`select payload ->> 'n' as n from public.claim_messages(${queue}, 1, 30)`;
    release();
    await firstTx;
    assert.deepEqual(first, ["1"]);
    assert.deepEqual(beside.map((r) => r.n), ["2"]);
  } finally {
    await a.end();
    await b.end();
  }
});
