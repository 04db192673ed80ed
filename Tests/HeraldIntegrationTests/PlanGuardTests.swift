import Foundation
import HTTPTypes
import HeraldCore
import Hummingbird
import HummingbirdTesting
import PostgresNIO
import Testing

@testable import HeraldStore

/// Query-plan guards (issue 12): the hot reads must read a number of rows that follows what they
/// return, not the size of the user's feed or of the organisation. Each guard runs the statement
/// the code sends under `EXPLAIN (ANALYZE, FORMAT JSON)` as the application role and adds up the
/// rows PostgreSQL read from `notifications` (returned or filtered out, over every loop), so a
/// plan that sorts a whole feed or filters a whole organisation fails it, whatever its shape.
@Suite("Query-plan guards")
struct PlanGuardTests {
    let env: TestEnvironment

    init() async throws {
        env = try await TestEnvironment.shared
    }

    /// Rows read from `relation` by `query`, as `EXPLAIN ANALYZE` counts them.
    func rowsRead(_ query: PostgresQuery, in tx: TenantTransaction, from relation: String = "notifications") async throws -> Int {
        let explain = PostgresQuery(unsafeSQL: "EXPLAIN (ANALYZE, FORMAT JSON) " + query.sql, binds: query.binds)
        let rows = try await tx.query(explain)
        let plan = try rows[0].decode(JSONDocument<JSONValue>.self).value
        return Self.rows(of: relation, in: plan)
    }

    static func rows(of relation: String, in node: JSONValue) -> Int {
        switch node {
        case .array(let items):
            return items.map { rows(of: relation, in: $0) }.reduce(0, +)
        case .object(let fields):
            var total = fields.filter { $0.key != "Plan" && $0.key != "Plans" }.values.map { rows(of: relation, in: $0) }.reduce(0, +)
            if case .string(relation) = fields["Relation Name"] {
                let loops = number(fields["Actual Loops"]) ?? 1
                let seen = ["Actual Rows", "Rows Removed by Filter", "Rows Removed by Index Recheck"].compactMap { number(fields[$0]) }
                total += Int((seen.reduce(0, +) * loops).rounded())
            }
            if let plan = fields["Plan"] { total += rows(of: relation, in: plan) }
            if let plans = fields["Plans"] { total += rows(of: relation, in: plans) }
            return total
        default:
            return 0
        }
    }

    static func number(_ value: JSONValue?) -> Double? {
        if case .number(let number)? = value { return number }
        return nil
    }

    @Test("the bell's first page reads about a page of rows, at 3 000 rows as at 20")
    func firstPageFollowsThePage() async throws {
        let org = try await TestOrganisation.make()
        _ = try await TestCatalogue.make(in: org)
        try await org.assignTask(to: [org.memberID], title: "seed")
        try await env.database.withTenant(org.id) { tx in try await tx.duplicateFeedForTest(userID: org.memberID, copies: 3_000) }
        let page = 20
        func read(_ comment: Comment) async throws {
            let now = Date()
            let (first, generic, general) = try await env.database.withTenant(org.id, recipient: org.memberID) { tx in
                let first = FirstFeedPage(organisationID: org.id, userID: org.memberID, now: now, limit: page + 1)
                let prepared = PostgresQuery(unsafeSQL: FirstFeedPage.sql, binds: try first.makeBindings())
                // The general statement (a filter that selects every row) sorts the whole feed: the
                // measure must see that, or it could not fail.
                let general = try await rowsRead(
                    tx.feedQuery(of: org.memberID, filter: FeedFilter(since: .distantPast), limit: page, after: nil, now: now), in: tx)
                let custom = try await rowsRead(prepared, in: tx)
                // bell_first_page runs the same statement with its generic plan (migration 0031).
                try await tx.query("SET LOCAL plan_cache_mode = force_generic_plan")
                return (custom, try await rowsRead(prepared, in: tx), general)
            }
            #expect(first <= 3 * (page + 1), "first page read \(first) rows: \(comment)")
            #expect(generic <= 3 * (page + 1), "first page's generic plan read \(generic) rows: \(comment)")
            #expect(generic >= page, "first page's generic plan read \(generic) rows: \(comment)")
            // And at least the page: the plan shows the rows it read (feed_first_page is inlined, not a
            // function scan that would hide them).
            #expect(first >= page, "first page read \(first) rows: \(comment)")
            #expect(general > 3_000, "the general statement read \(general) rows: \(comment)")
        }
        try await read("3 001 unread rows: the unread leg fills the page")
        // "All read", settled: as when the rows are older than the settling time (15 minutes), the
        // normal case. Rows inside the settling time are walked by the unread leg, as the unread
        // count walks them (0002_engine.sql), so the fixture's rows, all made now, say so.
        let mark = TimeOrderedID.upperBound(at: Date())
        try await org.store { tx in try await tx.markAllRead(of: org.memberID, through: mark, settled: mark) }
        for i in 0..<3 { try await org.assignTask(to: [org.memberID], title: "after all read \(i)") }
        try await read("3 unread above the settled watermark, 3 001 read below it: both legs run")
    }

    @Test("the batched reads of a stream fan-out follow the batch, not the organisation")
    func batchedReadsFollowTheBatch() async throws {
        let org = try await TestOrganisation.make()
        _ = try await TestCatalogue.make(in: org)
        let users = try await org.store { tx in
            try await (0..<60).asyncMap { i in try await tx.createUser(NewUser(email: "p\(i)@x.example", displayName: "P\(i)")).id }
        }
        for i in 0..<10 { try await org.assignTask(to: users, title: "fan-out \(i)") }
        let batch = Array(users.prefix(5))
        // Statistics that know these rows, as autovacuum's would: taken while other suites were
        // still writing (this suite run with a few others), they made every plan look cheap and
        // the reads walked the whole table, which says nothing about the indexes they follow.
        try await CitusReadinessTests.withClient(env.ownerURL, env.logger) {
            _ = try await $0.query("ANALYZE notifications, feed_state", logger: env.logger)
        }
        let (counted, fetched, returned) = try await env.database.withTenant(org.id) { tx in
            let now = Date()
            let ids = try await tx.query(
                "SELECT id FROM notifications WHERE organisation_id = \(org.id) AND user_id = ANY(\(batch)::uuid[])"
            ).map { try $0.decode(UUID.self) }
            return (
                try await rowsRead(tx.unreadCountsQuery(of: batch, now: now), in: tx),
                try await rowsRead(tx.feedItemsQuery(ids: ids, of: batch, now: now), in: tx),
                ids.count
            )
        }
        // 600 rows in the organisation, 50 of them the batch's: reading the batch's own is 50.
        #expect(returned == 50)
        #expect(counted <= 2 * returned, "the unread counts of 5 users read \(counted) rows")
        #expect(fetched <= 2 * returned, "the items of 5 users read \(fetched) rows")
    }

    @Test("a chunk of a large audience reads its chunk of users, not the users before it")
    func audienceChunkFollowsTheChunk() async throws {
        let org = try await TestOrganisation.make()
        let (everyone, chunk) = try await env.database.withTenant(org.id) { tx in
            _ = try await tx.query(
                """
                INSERT INTO users (organisation_id, email, display_name)
                SELECT \(org.id), 'a' || g || '@audience.example', 'A' || g FROM generate_series(1, 2000) g
                """)
            let after = try await tx.query(
                "SELECT id FROM users WHERE organisation_id = \(org.id) ORDER BY id OFFSET 1800 LIMIT 1"
            )[0].decode(UUID.self)
            let audience = Audience(everyone: true)
            // The whole audience reads every user: the measure sees the rows, or it could not fail.
            return (
                try await rowsRead(tx.recipientsQuery(for: audience, after: nil, limit: nil), in: tx, from: "users"),
                try await rowsRead(tx.recipientsQuery(for: audience, after: after, limit: 100), in: tx, from: "users")
            )
        }
        #expect(everyone > 2_000, "the whole audience read \(everyone) users")
        #expect(chunk <= 2 * 100 + 10, "a chunk of 100 after the 1 800th user read \(chunk) users")
    }

    @Test("the audience of a type the organisation does not have reads no user (a misspelt type in a dry run to everyone)")
    func audienceOfAnUnknownTypeReadsNothing() async throws {
        let org = try await TestOrganisation.make()
        _ = try await TestCatalogue.make(in: org)
        let (known, unknown, found) = try await env.database.withTenant(org.id) { tx in
            _ = try await tx.query(
                """
                INSERT INTO users (organisation_id, email, display_name)
                SELECT \(org.id), 'u' || g || '@unknown-type.example', 'U' || g FROM generate_series(1, 500) g
                """)
            let everyone = Audience(everyone: true)
            return (
                try await rowsRead(
                    tx.recipientsQuery(for: everyone, after: nil, limit: nil, typeKey: "ISQ_CRITICAL"), in: tx, from: "users"),
                try await rowsRead(
                    tx.recipientsQuery(for: everyone, after: nil, limit: nil, typeKey: "ISQ_CRITCAL"), in: tx, from: "users"),
                try await tx.query(tx.recipientsQuery(for: everyone, after: nil, limit: nil, typeKey: "ISQ_CRITCAL")).count
            )
        }
        // The known type's read is measured the same way, or the unknown one's 0 could not fail.
        #expect(known >= 500, "the audience of a known type read \(known) users")
        #expect(unknown == 0 && found == 0, "the audience of an unknown type read \(unknown) users and returned \(found)")
        // Through the API: the same 422 as before.
        let app = try env.application()
        try await app.test(.router) { client in
            let answer = try await client.send(
                .post, "/v1/events/dry-run", token: org.ownerToken, json: #"{"type": "ISQ_CRITCAL", "audience": {"everyone": true}}"#)
            #expect(answer.isProblem(.unprocessableContent), "\(answer.text)")
            #expect(answer.text.contains("ISQ_CRITCAL"), "\(answer.text)")
        }
    }

    @Test(
        "a chunk of a group's and a role's members reads the chunk's entries, not the members before it, and says which sources named each user (0035)"
    )
    func audienceChunkOfMembersFollowsTheChunk() async throws {
        let org = try await TestOrganisation.make()
        let (chunk, groupEntries, roleEntries, named) = try await env.database.withTenant(org.id) { tx in
            let group = try await tx.createGroup(key: "big", name: "Big", description: "")
            let role = try await tx.builtinRole(.service)
            _ = try await tx.query(
                """
                WITH added AS (
                    INSERT INTO users (organisation_id, email, display_name)
                    SELECT \(org.id), 'm' || g || '@members.example', 'M' || g FROM generate_series(1, 2000) g RETURNING id),
                members AS (INSERT INTO group_members (organisation_id, group_id, user_id) SELECT \(org.id), \(group.id), id FROM added)
                INSERT INTO user_roles (organisation_id, user_id, role_id) SELECT \(org.id), id, \(role.id) FROM added
                """)
            let ids = try await tx.query(
                "SELECT id FROM users WHERE organisation_id = \(org.id) AND email LIKE '%@members.example' ORDER BY id"
            ).map { try $0.decode(UUID.self) }
            let after = ids[1800]
            let named = ids[1810]
            // A named user deleted since the event was accepted takes no place in the chunk.
            let gone = ids[1805]
            _ = try await tx.query("DELETE FROM users WHERE organisation_id = \(org.id) AND id = \(gone)")
            let audience = Audience(userIDs: [named, gone], roleKeys: ["service"], groupKeys: ["big"])
            let (group0, role0) = (try await entriesRead(of: "group_members", in: tx), try await entriesRead(of: "user_roles", in: tx))
            let chunk = try await tx.recipients(for: audience, after: after, limit: 100)
            let (group1, role1) = (try await entriesRead(of: "group_members", in: tx), try await entriesRead(of: "user_roles", in: tx))
            return (chunk, group1 - group0, role1 - role0, named)
        }
        // The 100 users after the 1 800th (one deleted): each named by the group and the role, one also by id.
        #expect(chunk.count == 100)
        #expect(chunk.allSatisfy { $0.candidate.byGroups == ["big"] && $0.candidate.byRoles == ["service"] })
        #expect(chunk.filter(\.candidate.byUser).map(\.candidate.userID) == [named])
        // One read of each source: the chunk's entries (and the cursor's own), no lookup per user.
        #expect(groupEntries <= 100 + 10, "a chunk of 100 after the 1 800th member read \(groupEntries) group entries")
        #expect(roleEntries <= 100 + 10, "a chunk of 100 after the 1 800th member read \(roleEntries) role entries")
    }

    /// Entries read from every index of `relation`, and its rows read by sequential scans, as this
    /// connection's pending counters have them (they see inside functions too; PostgreSQL clears
    /// them only between transactions, so compare two readings of one transaction).
    func entriesRead(of relation: String, in tx: TenantTransaction) async throws -> Int {
        try await tx.query(
            """
            SELECT (coalesce(sum(pg_stat_get_xact_tuples_returned(i.indexrelid)), 0)
                    + pg_stat_get_xact_tuples_returned(\(relation)::regclass))::bigint
            FROM pg_index i WHERE i.indrelid = \(relation)::regclass
            """
        )[0].decode(Int.self)
    }

    /// What `body` returns, and the entries it read from `relation`'s indexes and sequential scans.
    func reading<Result>(_ relation: String, in tx: TenantTransaction, _ body: () async throws -> Result) async throws -> (Result, Int) {
        let before = try await entriesRead(of: relation, in: tx)
        let result = try await body()
        return (result, try await entriesRead(of: relation, in: tx) - before)
    }

    @Test("give-backs, heartbeats and completions find their rows by key, not by walking every lease in flight")
    func fencesFindRowsByKey() async throws {
        // A database of its own: the statistics below must see exactly these rows, and taking
        // them must not change the plans of suites running beside this one.
        try await env.withScratchDatabase("fence") { app, worker, ownerURL in
            let busy = try await app.emailOutbox("fence-busy", users: 400, events: 1)
            let org = try await app.emailOutbox("fence", users: 100, events: 1)
            // Statistics from before the claims, which know both organisations and believe no row
            // is in flight: as after a burst, and as on the bench's database where the fence walked
            // the leases.
            try await CitusReadinessTests.withClient(ownerURL, env.logger) { _ = try await $0.query("ANALYZE", logger: env.logger) }
            // The other organisation's 400 emails in flight: the entries of deliveries_lease_claim
            // (not per organisation) that a fence written as "status = 'SENDING'" can walk.
            let held = try await worker.claimDeliveries(worker: "held", limit: 400, leaseSeconds: 600, organisation: busy)
            #expect(held.count == 400)
            let claimed = try await worker.claimDeliveries(worker: "fence", limit: 20, leaseSeconds: 60, organisation: org)
            #expect(claimed.count == 20)
            let (reads, given, extended, recorded) = try await worker.withTenant(org) { tx in
                // The plans PL/pgSQL keeps after a few calls, and prepared statements have.
                _ = try await tx.query("SET LOCAL plan_cache_mode = force_generic_plan")
                var reads = [try await entriesRead(of: "deliveries", in: tx)]
                let given = try await tx.releaseDeliveries(claimed.prefix(5).map { ($0, Date()) }, worker: "fence")
                reads.append(try await entriesRead(of: "deliveries", in: tx))
                let extended = try await tx.extendLeases(worker: "fence", claims: Array(claimed.dropFirst(5)), leaseSeconds: 60)
                reads.append(try await entriesRead(of: "deliveries", in: tx))
                let recorded = try await tx.completeDeliveries(
                    claimed.dropFirst(5).map { ($0, Date(), AttemptResult.sent(responseCode: 250)) }, worker: "fence")
                reads.append(try await entriesRead(of: "deliveries", in: tx))
                return (zip(reads.dropFirst(), reads).map { $0 - $1 }, given, extended, recorded)
            }
            #expect(given == Array(repeating: true, count: 5) && extended == 15 && recorded == Array(repeating: true, count: 15))
            // Each row found by its key reads one index entry per version of it that vacuum has not
            // cleared (two or three here), and a completion once more for its attempt's foreign
            // key. Reading the organisation's 100 rows, or the 400 leases in flight, for each
            // statement or row would read hundreds or thousands.
            #expect(reads[0] > 0 && reads[0] <= 4 * 5, "giving back 5 read \(reads[0]) index entries and rows")
            #expect(reads[1] > 0 && reads[1] <= 4 * 15, "extending 15 leases read \(reads[1]) index entries and rows")
            #expect(reads[2] > 0 && reads[2] <= 8 * 15, "recording 15 attempts read \(reads[2]) index entries and rows")
        }
    }

    @Test("the organisations with due deliveries are found without reading every due row")
    func dueOrganisationsFollowTheClaim() async throws {
        try await env.withScratchDatabase("due") { app, worker, ownerURL in
            // Statistics taken while no delivery existed (a new database, as the bench's before its
            // delivery run): the burst of due rows below is not in them.
            try await CitusReadinessTests.withClient(ownerURL, env.logger) {
                _ = try await $0.query("VACUUM ANALYZE deliveries", logger: env.logger)
            }
            let due = try await app.emailOutbox("due", users: 2_000, events: 1)
            let (found, read) = try await worker.withTenant(due) { tx in
                // The plan PL/pgSQL keeps after a few calls.
                _ = try await tx.query("SET LOCAL plan_cache_mode = force_generic_plan")
                return try await reading("deliveries", in: tx) {
                    try await tx.query("SELECT organisation_id, due FROM due_delivery_organisations(16)").map {
                        try $0.decode((UUID, Int).self)
                    }
                }
            }
            #expect(found.map(\.0) == [due] && found.map(\.1) == [16])
            // The first due entry of each organisation, and up to a claim's worth of its due rows
            // counted. Reading every due row to sort them (a bitmap scan, which the statistics
            // above favour) reads the 2 000.
            #expect(read > 0 && read <= 16 + 16, "finding 1 organisation with 2 000 due rows read \(read) index entries and rows")
        }
    }

    @Test(
        "a claim takes no more of an endpoint's rows than it has room for, reads no more of them, and finds the emails behind them; an open circuit's rows stay due"
    )
    func claimFollowsEndpointRoom() async throws {
        try await env.withScratchDatabase("room") { app, worker, ownerURL in
            // Statistics taken while no delivery existed, as for the organisations above.
            try await CitusReadinessTests.withClient(ownerURL, env.logger) {
                _ = try await $0.query("VACUUM ANALYZE deliveries", logger: env.logger)
            }
            let org = try await app.emailOutbox("room", users: 2_000, events: 0)
            // 2 000 webhook rows to one endpoint, then 3 emails of a later event behind them.
            let endpoint = try await app.withTenant(org) { tx in
                let (endpoint, users) = try await hookEndpoint(tx)
                for (type, audience) in [("HOOK", users), ("NEWS", Array(users.prefix(3)))] {
                    _ = try await writeEvent(tx, type, to: audience)
                }
                _ = try await tx.query("UPDATE deliveries SET next_attempt_at = now() - interval '1 minute' WHERE endpoint_id IS NOT NULL")
                return endpoint
            }
            /// One claim of up to 16 with 4 slots per endpoint, `busy` as the pool says; the
            /// rows claimed (their endpoints) and the entries of deliveries read.
            func claim(_ busy: [UUID: Int]) async throws -> ([UUID?], Int) {
                try await worker.withTenant(org) { tx in
                    _ = try await tx.query("SET LOCAL plan_cache_mode = force_generic_plan")
                    let keys = Array(busy.keys), rooms = keys.map { busy[$0]! }
                    return try await reading("deliveries", in: tx) {
                        try await tx.query(
                            "SELECT endpoint_id FROM claim_deliveries('guard', 16, 60, \(org), 4, \(keys)::uuid[], \(rooms)::integer[])"
                        ).map { try $0.decode(UUID?.self) }
                    }
                }
            }
            let (first, firstRead) = try await claim([:])
            #expect(first.filter { $0 == endpoint.id }.count == 4 && first.filter { $0 == nil }.count == 3, "\(first)")
            // The endpoint's 4, the 3 emails, the organisation's endpoints; not the 2 000 rows.
            #expect(firstRead > 0 && firstRead <= 4 * (4 + 3) + 8, "a claim behind 2 000 rows of a full endpoint read \(firstRead)")
            // The pool holds the 4: its next claims take none, and read next to nothing.
            let (full, fullRead) = try await claim([endpoint.id: 0])
            #expect(full.isEmpty && fullRead <= 4, "\(full), read \(fullRead)")
            #expect(try await claim([endpoint.id: 1]).0 == [endpoint.id])
            // An open circuit: none; half-open: one (the trial).
            let opened = { (retry: String) in
                try await app.withTenant(org) { tx in
                    _ = try await tx.query(
                        "UPDATE endpoints SET circuit_opened_at = now(), circuit_retry_at = now() + \(retry)::interval WHERE id = \(endpoint.id)"
                    )
                }
            }
            try await opened("1 minute")
            #expect(try await claim([:]).0.isEmpty)
            try await opened("-1 second")
            #expect(try await claim([:]).0 == [endpoint.id])
            // The rows not claimed were not touched: still due, never handed back.
            let untouched = try await app.withTenant(org) { tx in
                try await tx.query(
                    "SELECT count(*)::int FROM deliveries WHERE endpoint_id IS NOT NULL AND status = 'PENDING' AND attempts = 0 AND waiting_since IS NULL"
                )[0].decode(Int.self)
            }
            #expect(untouched == 2_000 - 6)
            // The organisations a claim would serve count what it could take (0060): the
            // half-open endpoint's one row, nothing while the pool's slots of it are full or its
            // circuit open; read by the endpoint's own range, not its 1 994 waiting rows (the
            // organisations' walks of both indexes and the emails' leg read a few entries each).
            func due(_ busy: [UUID: Int]) async throws -> ([Int], Int) {
                try await worker.withTenant(org) { tx in
                    _ = try await tx.query("SET LOCAL plan_cache_mode = force_generic_plan")
                    let keys = Array(busy.keys), rooms = keys.map { busy[$0]! }
                    return try await reading("deliveries", in: tx) {
                        try await tx.query(
                            "SELECT due FROM due_delivery_organisations(16, 4, \(keys)::uuid[], \(rooms)::integer[]) WHERE organisation_id = \(org)"
                        ).map { try $0.decode(Int.self) }
                    }
                }
            }
            let (halfOpen, halfOpenRead) = try await due([:])
            #expect(halfOpen == [1] && halfOpenRead <= 24, "\(halfOpen), read \(halfOpenRead)")
            #expect(try await due([endpoint.id: 0]).0.isEmpty)
            try await opened("1 minute")
            let (open, openRead) = try await due([:])
            #expect(open.isEmpty && openRead <= 24, "\(open), read \(openRead)")
            // The backlog's age counts the endpoint's rows (due a minute ago), not only the emails.
            let age = try await app.withTenant(org) { tx in try await tx.outboxStats(now: Date()).oldestPendingAge }
            #expect(age.map { $0 >= 59 } == true, "\(String(describing: age))")
        }
    }

    @Test("a claim takes an organisation's urgent rows first, without reading the backlog before them")
    func claimTakesUrgentRowsFirst() async throws {
        try await env.withScratchDatabase("urgent") { app, worker, ownerURL in
            try await CitusReadinessTests.withClient(ownerURL, env.logger) {
                _ = try await $0.query("VACUUM ANALYZE deliveries", logger: env.logger)
            }
            let org = try await app.emailOutbox("urgent", users: 2_000, events: 0)
            // A backlog of normal rows due a minute ago: 2 000 webhooks to one endpoint and 2 000
            // emails; then, due now, a low-priority email (the backlog's lane), a critical
            // webhook and a high-priority email.
            let (endpoint, urgent, low) = try await app.withTenant(org) { tx in
                let (endpoint, users) = try await hookEndpoint(tx)
                func write(_ type: String, _ audience: [UUID], _ priority: Priority? = nil) async throws -> UUID {
                    try await writeEvent(tx, type, to: audience, priority: priority)
                }
                _ = try await write("HOOK", users)
                _ = try await write("NEWS", users)
                _ = try await tx.query("UPDATE deliveries SET next_attempt_at = now() - interval '1 minute'")
                // Written before the urgent rows: were it urgent, it would be the first of them.
                let low = try await write("NEWS", [users[2]], .low)
                let urgent = [try await write("HOOK", [users[0]], .critical), try await write("NEWS", [users[1]], .high)]
                return (endpoint, urgent, low)
            }
            /// One claim of up to `limit` with 4 slots per endpoint and the endpoint's room as
            /// given: the events of the rows claimed, and the entries of deliveries read.
            func claim(_ limit: Int, room: Int) async throws -> ([UUID], Int) {
                try await worker.withTenant(org) { tx in
                    _ = try await tx.query("SET LOCAL plan_cache_mode = force_generic_plan")
                    return try await reading("deliveries", in: tx) {
                        try await tx.query(
                            """
                            SELECT d.event_id FROM claim_deliveries('guard', \(limit)::integer, 60, \(org), 4, ARRAY[\(endpoint.id)]::uuid[], ARRAY[\(room)]::integer[]) c
                            JOIN deliveries d ON d.organisation_id = c.organisation_id AND d.id = c.delivery_id
                            """
                        ).map { try $0.decode(UUID.self) }
                    }
                }
            }
            // Room for one webhook and one more row: the two urgent rows, though 4 000 rows came
            // due a minute before them.
            let (first, read) = try await claim(2, room: 1)
            #expect(Set(first) == Set(urgent), "\(first)")
            #expect(read > 0 && read <= 16, "the urgent rows behind 4 000 others read \(read) entries")
            // Then the backlog, oldest first, before the low-priority email due after it.
            let (next, _) = try await claim(10, room: 4)
            #expect(next.count == 10 && !next.contains(low) && Set(next).isDisjoint(with: urgent), "\(next)")
        }
    }

    @Test("a digest claim reads about a claim's worth of due runs, not every due run")
    func digestClaimFollowsTheClaim() async throws {
        try await env.withScratchDatabase("digestclaim") { app, worker, ownerURL in
            // Statistics taken while no run existed, then 2 000 runs due at once (a slot's runs).
            try await CitusReadinessTests.withClient(ownerURL, env.logger) {
                _ = try await $0.query("VACUUM ANALYZE digest_runs", logger: env.logger)
            }
            let org = try await app.emailOutbox("digestclaim", users: 2_000, events: 0)
            // Runs are the claim's to make (only the owner may insert them directly).
            try await CitusReadinessTests.withClient(ownerURL, env.logger) { client in
                try await client.withConnection { connection in
                    _ = try await connection.query("SELECT set_config('app.org_id', \(org.lowercased), false)", logger: env.logger)
                    _ = try await connection.query(
                        """
                        INSERT INTO digest_runs (organisation_id, id, user_id, frequency, slot_at, next_attempt_at, frozen_at)
                        SELECT organisation_id, gen_random_uuid(), id, 'DAILY', now() - interval '1 minute', now() - interval '1 minute', now()
                        FROM users
                        """, logger: env.logger)
                }
            }
            let (claimed, read) = try await worker.withTenant(org) { tx in
                try await reading("digest_runs", in: tx) {
                    try await tx.query("SELECT run_id FROM claim_digest_runs('guard', 8, 60, now(), NULL, false)").count
                }
            }
            #expect(claimed == 8)
            // The 8 claimed (and their updates' lookups by key); a bitmap scan read all 2 000.
            #expect(read > 0 && read <= 8 * 4, "claiming 8 of 2 000 due runs read \(read) index entries and rows")
        }
    }
}

/// A webhook endpoint where nothing listens and a type `HOOK` that sends to it, in an organisation
/// `emailOutbox` made; with the organisation's users by address.
private func hookEndpoint(_ tx: TenantTransaction) async throws -> (Endpoint, [UUID]) {
    let endpoint = try await tx.createEndpoint(
        channel: .webhook, format: .standard, name: "one", url: "http://127.0.0.1:9/hook", eventTypes: [],
        secret: WebhookSecret.generate().string)
    let category = try #require(try await tx.categories().first)
    _ = try await tx.createNotificationType(
        NotificationTypeFields(
            key: "HOOK", categoryID: category.id, name: "Hook", description: "", defaultSeverity: .info,
            defaultPriority: .normal, defaultChannels: [.webhook]))
    return (endpoint, try await tx.query("SELECT id FROM users ORDER BY email").map { try $0.decode(UUID.self) })
}

/// An event of `type` to `audience`, planned and written as notify would; its id.
private func writeEvent(_ tx: TenantTransaction, _ type: String, to audience: [UUID], priority: Priority? = nil) async throws -> UUID {
    let planned = try await tx.planEvent(
        EventRequest(typeKey: type, audience: Audience(userIDs: audience), payload: .object([:]), priority: priority), eventID: UUID(),
        now: Date())
    try await tx.write(planned.event, type: planned.type, plan: planned.plan)
    return planned.event.id
}
