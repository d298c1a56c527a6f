import assert from "node:assert/strict";
import postgres from "postgres";
import { app } from "../../supabase/functions/events/index.ts";
import { closeDb } from "../../shared/db.ts";
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

/** The fields of an event as the API shows it, sorted. */
const EVENT_FIELDS = [
  "aggregate_id",
  "aggregate_type",
  "causation_id",
  "correlation_id",
  "created_at",
  "event_type",
  "id",
  "metadata",
  "payload",
  "position",
  "user_id",
  "version",
];

const event = (id: string, extra: Record<string, unknown> = {}) => ({
  aggregate_type: "trip",
  aggregate_id: id,
  event_type: "trip_requested",
  payload: { fare: 5000 },
  ...extra,
});

dbTest("the service role appends one event and reads it back", async () => {
  const token = await serviceToken();
  const res = await call(app, "POST", "/events", { token, body: event("trip-1") });
  assert.equal(res.status, 201, JSON.stringify(res.body));
  assert.equal(res.body.event.version, 1);
  assert.deepEqual(res.body.event.payload, { fare: 5000 });
  const history = await call(app, "GET", "/events/aggregates/trip/trip-1", { token });
  assert.equal(history.status, 200);
  assert.equal(history.headers.get("content-type"), "application/json");
  // The history carries the very event the append returned, field for field.
  assert.deepEqual(history.body, {
    aggregate_type: "trip",
    aggregate_id: "trip-1",
    events: [res.body.event],
    next_from_version: null,
  });
  assert.deepEqual(Object.keys(res.body.event).sort(), EVENT_FIELDS);
});

dbTest("50 concurrent appends with the same expected version: one wins, 49 get 409", async () => {
  const token = await serviceToken();
  await call(app, "POST", "/events", { token, body: event("race") });
  const results = await Promise.all(
    Array.from({ length: 50 }, (_, i) =>
      call(app, "POST", "/events", {
        token,
        body: event("race", { event_type: "fare_changed", payload: { i }, expected_version: 1 }),
      })),
  );
  const statuses = results.map((r) => r.status).sort();
  assert.equal(statuses.filter((s) => s === 201).length, 1);
  assert.equal(statuses.filter((s) => s === 409).length, 49);
  for (const r of results.filter((r) => r.status === 409)) expectError(r, 409, "version_conflict");
  const [row] = await db.sql`select count(*)::int as n, max(version)::int as v
                             from public.event_store where aggregate_id = 'race'`;
  assert.deepEqual({ ...row }, { n: 2, v: 2 });
});

dbTest(
  "a repeatable read append behind a newer commit is a retryable 40001, not a conflict",
  async () => {
    // The stale transaction expects the version that was current when its
    // snapshot was taken; another append commits first. Under read committed
    // that is a 409 with the version now current; under repeatable read the
    // current version is invisible, so it must be a serialization failure
    // (retried by the functions), never a 409 naming the snapshot's version.
    const stale = postgres(db.url, { max: 1, onnotice: () => {} });
    try {
      await db.sql`select public.append_event('rr-moved', 'trip', 'created', '{}')`;
      for (const [id, expected] of [["rr-moved", 1], ["rr-new", 1]] as const) {
        const error = await stale.begin("isolation level repeatable read", async (tx) => {
          await tx`select count(*) from public.event_streams`; // takes the snapshot
          await db.sql`select public.append_event(${id}, 'trip', 'next', '{}')`; // commits first
          return await tx`select public.append_event(${id}, 'trip', 'stale', '{}',
                          p_expected_version := ${expected})`.then(() => null, (e) => e);
        }).catch((e) => e);
        assert.equal(error?.code, "40001", `${id}: ${error?.code} ${error?.message}`);
      }
    } finally {
      await stale.end();
    }
    const rows = await db.sql`select aggregate_id, max(version)::int as v from public.event_store
                            where aggregate_id in ('rr-moved', 'rr-new') group by 1 order by 1`;
    assert.deepEqual(rows.map((r) => [r.aggregate_id, r.v]), [["rr-moved", 2], ["rr-new", 1]]);
  },
);

dbTest("concurrent appends without expected versions get unique gapless versions", async () => {
  const clients = Array.from({ length: 8 }, () => postgres(db.url, { max: 1, onnotice: () => {} }));
  try {
    await Promise.all(clients.map((sql, c) =>
      (async () => {
        for (let i = 0; i < 25; i++) {
          await sql`select public.append_event('gapless', 'trip', 'tick', ${sql.json({ c, i })})`;
        }
      })()
    ));
  } finally {
    await Promise.all(clients.map((c) => c.end()));
  }
  const rows = await db.sql`select version::int from public.event_store
                            where aggregate_id = 'gapless' order by version`;
  assert.deepEqual(rows.map((r) => r.version), Array.from({ length: 200 }, (_, i) => i + 1));
});

/**
 * Deadlocks Postgres has detected in the test database. A backend reports its
 * count when idle at most once a second, and at the latest as it exits, so the
 * functions' pool is closed first and its backends are waited out: after that
 * every deadlock they met is counted.
 */
async function deadlocks(): Promise<number> {
  await closeDb();
  for (let i = 0;; i++) {
    const [{ n }] = await db.sql`select count(*)::int as n from pg_stat_activity
                                 where datname = current_database()
                                   and application_name = 'easymo-functions'`;
    if (n === 0) break;
    if (i === 200) throw new Error(`${n} function connections did not go away`);
    await new Promise((r) => setTimeout(r, 25));
  }
  await db.sql`select pg_stat_clear_snapshot()`;
  const [row] = await db.sql`select deadlocks::int as n from pg_stat_database
                             where datname = current_database()`;
  return row.n;
}

dbTest("batches over the same aggregates in opposite orders do not deadlock", async () => {
  const token = await serviceToken();
  // shared/db.ts retries a deadlock, so the answers alone cannot show one.
  const before = await deadlocks();
  const results = await Promise.all(
    Array.from({ length: 20 }, (_, i) =>
      call(app, "POST", "/events", {
        token,
        body: {
          events: i % 2
            ? [event("cross-a"), event("cross-b")]
            : [event("cross-b"), event("cross-a")],
        },
      })),
  );
  assert.deepEqual(results.map((r) => r.status), Array(20).fill(201));
  const rows = await db.sql`select aggregate_id, array_agg(version order by version)::int[] as v
                            from public.event_store where aggregate_id like 'cross-%'
                            group by aggregate_id order by aggregate_id`;
  const gapless = Array.from({ length: 20 }, (_, i) => i + 1);
  assert.deepEqual(rows.map((r) => [r.aggregate_id, r.v]), [["cross-a", gapless], [
    "cross-b",
    gapless,
  ]]);
  assert.equal(await deadlocks() - before, 0, "Postgres detected no deadlock");
});

dbTest("a batch is atomic and bad input writes nothing", async () => {
  const token = await serviceToken();
  const ok = await call(app, "POST", "/events", {
    token,
    body: {
      events: [event("batch-1"), event("batch-1", { expected_version: 1 }), event("batch-2")],
    },
  });
  assert.equal(ok.status, 201, JSON.stringify(ok.body));
  assert.deepEqual(ok.body.events.map((e: { version: number }) => e.version), [1, 2, 1]);

  const conflict = await call(app, "POST", "/events", {
    token,
    body: { events: [event("batch-2"), event("batch-1", { expected_version: 1 })] },
  });
  expectError(conflict, 409, "version_conflict");
  // each error names the field at fault, in a single event as in a batch
  const paths = (err: { details?: unknown }) =>
    (err.details as { path: string }[]).map((d) => d.path);
  const badPayload = expectError(
    await call(app, "POST", "/events", { token, body: event("bad", { payload: [1] }) }),
    400,
    "invalid_request",
  );
  assert.deepEqual(paths(badPayload), ["payload"]);
  const badVersion = expectError(
    await call(app, "POST", "/events", { token, body: event("bad", { expected_version: -2 }) }),
    400,
    "invalid_request",
  );
  assert.deepEqual(paths(badVersion), ["expected_version"]);
  const badInBatch = expectError(
    await call(app, "POST", "/events", {
      token,
      body: { events: [event("bad"), event("bad", { expected_version: 1.5 })] },
    }),
    400,
    "invalid_request",
  );
  assert.deepEqual(paths(badInBatch), ["events.1.expected_version"]);
  expectError(
    await call(app, "POST", "/events", {
      token,
      body: event("bad", { aggregate_type: "Bad Type" }),
    }),
    400,
    "invalid_request",
  );
  for (const id of [".", ".."]) {
    const dotted = expectError(
      await call(app, "POST", "/events", { token, body: event(id) }),
      400,
      "invalid_request",
    );
    assert.deepEqual(paths(dotted), ["aggregate_id"], `${id}: no URL could read it back`);
  }
  const [row] = await db.sql`select count(*)::int as n from public.event_store
                             where aggregate_id in ('batch-1', 'batch-2', 'bad', '.', '..')`;
  assert.equal(row.n, 3);
});

dbTest("history is in version order from a version, with paging", async () => {
  const token = await serviceToken();
  const events = Array.from({ length: 5 }, (_, i) => event("paged", { payload: { i } }));
  assert.equal((await call(app, "POST", "/events", { token, body: { events } })).status, 201);
  const page = await call(app, "GET", "/events/aggregates/trip/paged?from_version=2&limit=2", {
    token,
  });
  assert.deepEqual(page.body.events.map((e: { version: number }) => e.version), [2, 3]);
  assert.equal(page.body.next_from_version, 4);
  // The route reads limit + 1 rows and SQL reads at most 10000.
  const widest = await call(app, "GET", "/events/aggregates/trip/paged?limit=9999", { token });
  assert.equal(widest.status, 200, JSON.stringify(widest.body));
  assert.equal(widest.body.events.length, 5);
  assert.equal(widest.body.next_from_version, null);
  expectError(
    await call(app, "GET", "/events/aggregates/trip/paged?limit=10000", { token }),
    400,
    "invalid_request",
  );
  expectError(await call(app, "GET", "/events/aggregates/trip/nothing-here", { token }), 404);
});

// Pages are bounded in bytes as well as rows: 13 events of 300 kB each (a
// payload that compresses to almost nothing in storage), read 4 a page,
// about 1.2 MB, never all at once.
dbTest("history and stream pages stop at about a megabyte of payloads", async () => {
  const token = await serviceToken();
  const after = await headPosition();
  await db
    .sql`select public.append_event('heavy', 'trip', 'x', jsonb_build_object('blob', repeat('x', 300000), 'i', i))
               from generate_series(1, 13) i`;
  const versions: number[][] = [];
  let from: number | null = 1;
  while (from !== null) {
    const res = await call(app, "GET", `/events/aggregates/trip/heavy?from_version=${from}`, {
      token,
    });
    assert.equal(res.status, 200);
    assert.ok(JSON.stringify(res.body).length < 1_300_000, "a history page of about a megabyte");
    versions.push(res.body.events.map((e: { version: number }) => e.version));
    from = res.body.next_from_version;
  }
  assert.deepEqual(versions, [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12], [13]]);
  const stream = await call(app, "GET", `/events/stream?after_position=${after}&limit=10000`, {
    token,
  });
  assert.equal(stream.status, 200);
  assert.deepEqual(stream.body.events.map((e: { version: number }) => e.version), [1, 2, 3, 4]);
  assert.equal(stream.body.next_after_position, after + 4);
  assert.deepEqual(Object.keys(stream.body.events[0]).sort(), EVENT_FIELDS);
});

dbTest("users read their own aggregates only; anon nothing", async () => {
  const alice = await createUser(db);
  const bob = await createUser(db);
  const aliceToken = await userToken(alice);
  const created = await call(app, "POST", "/events", {
    token: aliceToken,
    body: event("ride-alice"),
  });
  assert.equal(created.status, 201);
  assert.equal(created.body.event.user_id, alice);
  const mine = await call(app, "GET", "/events/aggregates/trip/ride-alice", { token: aliceToken });
  assert.equal(mine.body.events.length, 1);
  const bobToken = await userToken(bob);
  expectError(
    await call(app, "GET", "/events/aggregates/trip/ride-alice", { token: bobToken }),
    404,
  );
  expectError(
    await call(app, "POST", "/events", { token: bobToken, body: event("ride-alice") }),
    404,
    "aggregate_not_found",
  );
  expectError(await call(app, "GET", "/events/stream", { token: aliceToken }), 403);
  expectError(
    await call(app, "POST", "/events", {
      token: bobToken,
      body: { ...event("ride-bob"), user_id: alice },
    }),
    403,
    "forbidden",
  );
  // bob starts an id the backend later uses for alice: the backend's event is refused
  assert.equal(
    (await call(app, "POST", "/events", { token: bobToken, body: event("ride-next") })).status,
    201,
  );
  const service = await serviceToken();
  expectError(
    await call(app, "POST", "/events", {
      token: service,
      body: { ...event("ride-next"), user_id: alice },
    }),
    409,
    "aggregate_owned",
  );
  const bobsView = await call(app, "GET", "/events/aggregates/trip/ride-next", { token: bobToken });
  assert.equal(bobsView.body.events.length, 1);
  const anon = await anonToken();
  expectError(await call(app, "POST", "/events", { token: anon, body: event("x") }), 401);
  expectError(await call(app, "GET", "/events/aggregates/trip/ride-alice", { token: anon }), 401);
  expectError(await call(app, "GET", "/events/stream", { token: anon }), 401);
});

// A user's batch that names someone else's aggregate is refused before it
// locks anything. Bob's batch over his own aggregate and alice's would
// otherwise lock both (in key order, alice's first), and while it waits for
// his own (held here by another transaction) alice could not append.
dbTest("a stranger's batch is refused before it locks the other user's aggregate", async () => {
  const alice = await createUser(db);
  const bob = await createUser(db);
  const [aliceToken, bobToken] = [await userToken(alice), await userToken(bob)];
  const append = (token: string, body: unknown) => call(app, "POST", "/events", { token, body });
  assert.equal((await append(aliceToken, event("held-a"))).status, 201);
  assert.equal((await append(bobToken, event("held-b"))).status, 201);
  const blocker = await db.sql.reserve();
  try {
    await blocker`begin`;
    await blocker`select from public.event_streams where aggregate_id = 'held-b' for update`;
    const bobs = append(bobToken, { events: [event("held-b"), event("held-a")] });
    await new Promise((r) => setTimeout(r, 300));
    const alices = append(aliceToken, event("held-a", { event_type: "fare_changed" }));
    const first = await Promise.race([
      alices,
      new Promise((r) => setTimeout(() => r("still waiting"), 3000)),
    ]);
    await blocker`commit`;
    assert.notEqual(first, "still waiting", "alice waited on bob's refused batch");
    expectError(await bobs, 404, "aggregate_not_found");
    assert.equal((await alices).status, 201);
  } finally {
    await blocker`rollback`.catch(() => {});
    blocker.release();
  }
  const rows = await db.sql`select aggregate_id, version::int as v from public.event_streams
                            where aggregate_id in ('held-a', 'held-b') order by 1`;
  assert.deepEqual(rows.map((r) => [r.aggregate_id, r.v]), [["held-a", 2], ["held-b", 1]]);
});

/** A transaction on its own connection, begun and left open: commit() ends it. */
async function openTransaction() {
  const conn = await db.sql.reserve();
  await conn`begin`;
  return {
    sql: conn,
    commit: async () => {
      await conn`commit`;
      conn.release();
    },
  };
}

const streamAfter = async (after: number) => {
  const res = await call(app, "GET", `/events/stream?after_position=${after}`, {
    token: await serviceToken(),
  });
  assert.equal(res.status, 200);
  return res.body.events as { aggregate_id: string; version: number; position: number }[];
};

/** The stream's last position: pages followed to the end (a page holds about a megabyte). */
async function headPosition(): Promise<number> {
  const token = await serviceToken();
  let after = 0;
  for (;;) {
    const res = await call(app, "GET", `/events/stream?after_position=${after}&limit=10000`, {
      token,
    });
    assert.equal(res.status, 200);
    if (res.body.events.length === 0) return after;
    after = res.body.next_after_position;
  }
}

dbTest("the stream never skips an event whose transaction commits late", async () => {
  const token = await serviceToken();
  const after = await headPosition();

  const slow = await openTransaction();
  try {
    await slow.sql`select public.append_event('late', 'trip', 'slow_one', '{}')`;
    // a later transaction commits first: numbered at once, the open one waits
    assert.equal((await call(app, "POST", "/events", { token, body: event("early") })).status, 201);
    assert.deepEqual((await streamAfter(after)).map((e) => [e.aggregate_id, e.position]), [
      ["early", after + 1],
    ]);
  } finally {
    await slow.commit();
  }
  // a reader that stopped at after + 1 finds the late one next
  assert.deepEqual((await streamAfter(after + 1)).map((e) => [e.aggregate_id, e.position]), [
    ["late", after + 2],
  ]);
});

// A transaction takes its id at its first write, which may come before it
// waits for an aggregate another transaction is appending to: the aggregate's
// later version then belongs to the transaction with the smaller id. The
// stream must still give the aggregate's versions in order.
dbTest(
  "the stream gives an aggregate's versions in order, whichever transaction began first",
  async () => {
    const after = await headPosition();
    const first = await openTransaction();
    try {
      // the first transaction writes elsewhere, so holds the smaller id ...
      await first.sql`select public.append_event('elsewhere', 'trip', 'other', '{}')`;
      // ... while a second one appends version 1 and commits
      await db.sql`select public.append_event('contested', 'trip', 'trip_created', '{}')`;
      await first.sql`select public.append_event('contested', 'trip', 'trip_completed', '{}')`;
    } finally {
      await first.commit();
    }
    const events = (await streamAfter(after)).filter((e) => e.aggregate_id === "contested");
    assert.deepEqual(events.map((e) => e.version), [1, 2]);
  },
);

// The event's id is taken once the append holds the aggregate: an append that
// waited for it comes after everything numbered meanwhile.
dbTest(
  "an append that waited for its aggregate is numbered after the events written meanwhile",
  async () => {
    const after = await headPosition();
    const holder = await openTransaction();
    let waiting: Promise<unknown> | undefined;
    try {
      await holder.sql`select public.append_event('held', 'trip', 'a', '{}')`;
      waiting = db.sql`select public.append_event('held', 'trip', 'b', '{}')`.execute();
      await new Promise((r) => setTimeout(r, 200));
      await db.sql`select public.append_event('meanwhile', 'trip', 'c', '{}')`;
    } finally {
      await holder.commit();
    }
    await waiting;
    const events = (await streamAfter(after)).map((e) => `${e.aggregate_id}/${e.version}`);
    assert.deepEqual(events, ["held/1", "meanwhile/1", "held/2"]);
  },
);

// Numbering holds the sequencer until its transaction ends: a reader in a
// longer transaction (a projection applying what it read before it commits)
// must not hold it, or nothing written meanwhile is numbered for anyone.
dbTest("a reader in an open transaction does not stop the stream for others", async () => {
  const after = await headPosition();
  const reader = await openTransaction();
  try {
    await reader.sql`select count(*) from public.read_event_stream(0, 1)`;
    const token = await serviceToken();
    assert.equal(
      (await call(app, "POST", "/events", { token, body: event("meanwhile") })).status,
      201,
    );
    assert.deepEqual((await streamAfter(after)).map((e) => [e.aggregate_id, e.position]), [
      ["meanwhile", after + 1],
    ]);
  } finally {
    await reader.commit();
  }
});

dbTest("query numbers are decimal digits: not empty, hex, fractional or negative", async () => {
  const token = await serviceToken();
  for (const bad of ["", "0x2", "1.5", "-1", "1e3", "9".repeat(16)]) {
    for (const path of [`/events/stream?after_position=${bad}`, `/events/stream?limit=${bad}`]) {
      expectError(await call(app, "GET", path, { token }), 400, "invalid_request");
    }
  }
  const ok = await call(app, "GET", "/events/stream?after_position=0&limit=1", { token });
  assert.equal(ok.status, 200, JSON.stringify(ok.body));
});
