import Foundation
import HeraldCore
import Logging
import PostgresNIO
import Testing

@testable import HeraldAPI
@testable import HeraldStore

/// Tenant isolation proven in SQL, as the application role, for every tenant table the
/// catalogue lists: a table added without forced RLS and a policy fails these tests.
@Suite("Isolation in SQL, as the application role")
struct IsolationSQLTests {
    let env: TestEnvironment

    init() async throws {
        env = try await TestEnvironment.shared
    }

    /// Every table in the public schema but the migrator's own bookkeeping.
    func tenantTables() async throws -> [String] {
        var tables: [String] = []
        let rows = try await env.appClient.query(
            """
            SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') AND c.relname <> 'schema_migrations'
            ORDER BY c.relname
            """)
        for try await name in rows.decode(String.self) { tables.append(name) }
        return tables
    }

    /// The column that names a row's organisation.
    func tenantColumn(_ table: String) -> String { table == "organisations" ? "id" : "organisation_id" }

    /// One row in every tenant table for a fresh organisation.
    func populatedOrganisation() async throws -> TestOrganisation {
        let org = try await TestOrganisation.make()
        try await org.store { tx in
            let group = try await tx.createGroup(key: "g1", name: "Group", description: "")
            try await tx.addGroupMember(group.id, org.memberID)
            let role = try await tx.builtinRole(.service)
            let key = OpaqueToken(kind: .apiKey, organisationID: org.id)
            _ = try await tx.createApiKey(id: key.id, name: "k", roleID: role.id, secretHash: key.secretHash, expiresAt: nil)
            try await tx.insertRefreshToken(
                id: UUID(), familyID: UUID(), userID: org.memberID, secretHash: Data([1]),
                expiresAt: Date().addingTimeInterval(60))
            try await tx.audit(action: "test", targetType: "test", targetID: nil, before: nil, after: nil)
        }
        // The engine fills its own tables: events, in-app rows, deliveries, digest items, the trace.
        let catalogue = try await TestCatalogue.make(in: org)
        try await org.store { tx in
            try await tx.replacePreferenceDefaults(with: [
                PreferenceCell(
                    categoryID: catalogue.activity, channel: .email,
                    setting: PreferenceSetting(enabled: true, frequency: .weekly))
            ])
            try await tx.replacePreferences(
                ofUser: org.memberID,
                with: [
                    PreferenceCell(
                        categoryID: catalogue.alerts, channel: .email, setting: PreferenceSetting(enabled: true, frequency: .daily))
                ])
        }
        let (_, plan) = try await org.notify(
            EventRequest(
                typeKey: "ISQ_CRITICAL", audience: Audience(roleKeys: ["clinician"]),
                payload: .object(["isq": .number(25)])))
        #expect(!plan.deliveries.isEmpty && !plan.digestItems.isEmpty && !plan.notifications.isEmpty)
        // A run of the trace (0069), as a fan-out of a thousand recipients decided alike writes one.
        try await org.store { tx in
            try await tx.query(
                """
                INSERT INTO event_recipient_runs (organisation_id, event_id, first_user, last_user, category_id, targeted, rule, reason,
                                                  notified, decision_id, records_each, size, user_ids, records)
                SELECT organisation_id, event_id, user_id, user_id, category_id, targeted, rule, reason, notified,
                       coalesce(decision_id, gen_random_uuid()), 0, 1, ARRAY[user_id], ''::bytea
                FROM event_recipients WHERE organisation_id = \(org.id) LIMIT 1
                """)
        }
        // The owner has opened a stream (0043), so their "all read" is numbered and logged.
        try await org.store { tx in
            _ = try await tx.openFeedStream(of: org.ownerID)
            try await tx.markAllRead(of: org.ownerID, through: TimeOrderedID.upperBound(at: Date()))
        }
        // Live streams (0010): a row scheduled for next month waits in feed_due (the streams'
        // sweep leaves it there until then), and a stream ticket.
        try await org.notify(
            EventRequest(
                typeKey: "ISQ_CRITICAL", audience: Audience(userIDs: [org.memberID]), payload: .object(["isq": .number(30)]),
                deliverAt: Date().addingTimeInterval(30 * 86400)))
        try await org.store { tx in
            try await tx.createStreamTicket(
                id: UUID(), userID: org.memberID, sessionID: nil, secretHash: Data([2]), expiresAt: Date().addingTimeInterval(60))
        }
        // Digest runs (0012): the claim makes the runs of every slot due by next week.
        _ = try await env.workerDatabase.claimDigestRuns(
            worker: "fixture", limit: 10, leaseSeconds: 60, now: Date().addingTimeInterval(8 * 86400), organisation: org.id)
        // A digest template (0016).
        _ = try await org.store { tx in
            try await tx.putDigestTemplate(locale: "fr", content: TemplateContent(subject: "Résumé", body: "{{count}}"))
        }
        // A recurring schedule (0015) of the member's tasks.
        try await org.store { tx in
            _ = try await tx.createSchedule(
                id: UUID(), name: "weekly",
                event: EventRequest(typeKey: "TASK_ASSIGNED", audience: Audience(userIDs: [org.memberID]), payload: .object([:])),
                rule: "FREQ=WEEKLY", timeZone: "UTC", startsAt: Date(), nextAt: Date().addingTimeInterval(7 * 86_400))
        }
        // Scheduled jobs (0013): the organisation's jobs, and a run of one, claimed when due.
        let purge = try await org.store { tx in try await tx.job(named: .purgeExpired) }
        _ = try await env.workerDatabase.claimJobs(
            worker: "fixture", limit: 1, leaseSeconds: 60, now: purge.nextRunAt, organisation: org.id, name: .purgeExpired)
        // A webhook endpoint with a delivery that names it, and a click on that delivery's link.
        try await org.deliveryType("HOOKED", category: catalogue.activity, channels: [.webhook])
        try await org.store { tx in
            _ = try await tx.createEndpoint(
                channel: .webhook, format: .standard, name: "w", url: "https://93.184.216.34/hook", eventTypes: [],
                secret: WebhookSecret.generate().string)
        }
        let (_, hooked) = try await org.notify(
            EventRequest(typeKey: "HOOKED", audience: Audience(userIDs: [org.memberID]), payload: .object([:])))
        let webhook = try #require(hooked.deliveries.first)
        _ = try await org.store { tx in try await tx.recordClick(on: .delivery(webhook.id), userID: org.memberID) }
        // An attempt in the outbox's log: claim this organisation's deliveries and complete one.
        try await org.store { tx in
            for delivery in try await tx.deliveries(DeliveryFilter(), limit: 10, after: nil).items {
                try await tx.query(
                    "UPDATE deliveries SET status = 'SENDING', attempts = 1, lease_owner = 'fixture' WHERE id = \(delivery.id)")
                _ = try await tx.completeDelivery(
                    ClaimedDelivery(organisationID: org.id, deliveryID: delivery.id, attempt: 1),
                    worker: "fixture", startedAt: Date(), result: .sent(responseCode: 250))
            }
        }
        return org
    }

    /// Runs `body` in a transaction of the application role with `org`'s context (or none).
    func asApp<T: Sendable>(_ org: UUID?, _ body: (PostgresConnection) async throws -> T) async throws -> T {
        do {
            return try await env.appClient.withTransaction(logger: env.logger) { connection in
                if let org {
                    try await connection.query("SELECT set_config('app.org_id', \(org.uuidString), true)", logger: env.logger)
                }
                return try await body(connection)
            }
        } catch let error as PostgresTransactionError {
            throw error.closureError ?? error
        }
    }

    func count(_ connection: PostgresConnection, _ sql: String, _ org: UUID? = nil) async throws -> Int {
        let query: PostgresQuery = org.map { "\(unescaped: sql) \($0)" } ?? "\(unescaped: sql)"
        let rows = try await connection.query(query, logger: env.logger)
        for try await n in rows.decode(Int.self) { return n }
        return -1
    }

    /// The columns a row can be inserted with (generated columns left out), as a SQL list.
    func insertableColumns(_ table: String) async throws -> String {
        let rows = try await env.appClient.query(
            """
            SELECT string_agg(quote_ident(attname), ', ' ORDER BY attnum) FROM pg_attribute
            WHERE attrelid = ('public.' || \(table))::regclass AND attnum > 0 AND NOT attisdropped AND attgenerated = ''
            """)
        for try await columns in rows.decode(String.self) { return columns }
        return "*"
    }

    /// The SQLSTATE of inserting `row` (a JSON object) into `table` under `organisation`'s context, nil on success.
    func insertState(_ table: String, row: String, as organisation: UUID) async -> String? {
        guard let columns = try? await insertableColumns(table) else { return "no columns" }
        return await sqlState {
            try await asApp(organisation) { connection in
                _ = try await connection.query(
                    "INSERT INTO \(unescaped: table) (\(unescaped: columns)) SELECT \(unescaped: columns) FROM jsonb_populate_record(NULL::\(unescaped: table), \(row)::jsonb)",
                    logger: env.logger)
            }
        }
    }

    func sqlState(of work: () async throws -> Void) async -> String? {
        do {
            try await work()
            return nil
        } catch let error as PSQLError {
            return error.serverInfo?[.sqlState]
        } catch {
            return "\(error)"
        }
    }

    @Test("the application role is no superuser, cannot bypass RLS and owns nothing")
    func roleIsPlain() async throws {
        let rows = try await env.appClient.query(
            """
            SELECT r.rolsuper, r.rolbypassrls, r.rolcreaterole, r.rolcreatedb,
                   (SELECT count(*) FROM pg_class c WHERE c.relowner = r.oid),
                   (SELECT count(*) FROM pg_namespace s WHERE s.nspowner = r.oid)
            FROM pg_roles r WHERE r.rolname = current_user
            """)
        for try await (superuser, bypass, createRole, createDB, ownedRelations, ownedSchemas) in rows.decode(
            (Bool, Bool, Bool, Bool, Int, Int).self)
        {
            #expect(!superuser)
            #expect(!bypass)
            #expect(!createRole)
            #expect(!createDB)
            #expect(ownedRelations == 0)
            #expect(ownedSchemas == 0)
        }
    }

    @Test("every tenant table has RLS enabled and forced, a policy, and the tenant column")
    func everyTableForced() async throws {
        let tables = try await tenantTables()
        #expect(tables.count >= 10)
        for table in tables {
            let rows = try await env.appClient.query(
                """
                SELECT c.relrowsecurity, c.relforcerowsecurity,
                       (SELECT count(*) FROM pg_policy p WHERE p.polrelid = c.oid),
                       (SELECT count(*) FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attname = \(tenantColumn(table)) AND NOT a.attisdropped)
                FROM pg_class c WHERE c.oid = ('public.' || \(table))::regclass
                """)
            for try await (enabled, forced, policies, column) in rows.decode((Bool, Bool, Int, Int).self) {
                #expect(enabled, "\(table): row-level security is not enabled")
                #expect(forced, "\(table): row-level security is not forced")
                #expect(policies >= 1, "\(table): no policy")
                #expect(column == 1, "\(table): no \(tenantColumn(table)) column")
            }
        }
    }

    @Test("every foreign key between tenant tables is composite on organisation_id, and indexes lead with it")
    func keysAndIndexesLeadWithOrganisation() async throws {
        let fks = try await env.appClient.query(
            """
            SELECT c.conrelid::regclass::text, c.conname, a.attname
            FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace
            JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = c.conkey[1]
            WHERE n.nspname = 'public' AND c.contype = 'f' AND c.confrelid <> 'public.organisations'::regclass
            """)
        var seen = 0
        for try await (table, name, first) in fks.decode((String, String, String).self) {
            seen += 1
            #expect(first == "organisation_id", "\(table).\(name) does not start with organisation_id")
        }
        #expect(seen >= 8)
        let indexes = try await env.appClient.query(
            """
            SELECT t.relname, i.relname, a.attname
            FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid JOIN pg_class t ON t.oid = x.indrelid
            JOIN pg_namespace n ON n.oid = t.relnamespace
            LEFT JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = x.indkey[0]
            WHERE n.nspname = 'public' AND t.relname NOT IN ('organisations', 'schema_migrations')
            """)
        for try await (table, index, first) in indexes.decode((String, String, String?).self) {
            // The outbox's claim indexes find due work across organisations, for the one
            // SECURITY DEFINER claim function (sql/migrations/0003_outbox.sql), and so do the feed
            // stream sweep's (0010); they are named *_claim.
            if index.hasSuffix("_claim") { continue }
            #expect(first == "organisation_id", "\(table): index \(index) does not lead with organisation_id")
        }
    }

    @Test("with no tenant context every tenant table looks empty")
    func noContextSeesNothing() async throws {
        _ = try await populatedOrganisation()
        for table in try await tenantTables() {
            let n = try await asApp(nil) { try await count($0, "SELECT count(*) FROM \(table)") }
            #expect(n == 0, "\(table): \(n) rows visible without a tenant context")
        }
    }

    @Test("with organisation A's context, B's rows cannot be selected, counted, updated, deleted or inserted")
    func otherOrganisationUnreachable() async throws {
        let a = try await populatedOrganisation()
        let b = try await populatedOrganisation()
        for table in try await tenantTables() {
            let column = tenantColumn(table)
            // B's rows exist: B sees them.
            let bOwn = try await asApp(b.id) { try await count($0, "SELECT count(*) FROM \(table) WHERE \(column) =", b.id) }
            #expect(bOwn > 0, "\(table): the fixture has no row for B")
            // A sees none of them, by filter or by total.
            try await asApp(a.id) { connection in
                #expect(
                    try await count(connection, "SELECT count(*) FROM \(table) WHERE \(column) =", b.id) == 0,
                    "\(table): A selects B's rows")
                let total = try await count(connection, "SELECT count(*) FROM \(table)")
                let own = try await count(connection, "SELECT count(*) FROM \(table) WHERE \(column) =", a.id)
                #expect(total == own, "\(table): A counts rows that are not A's")
            }
            // Updates and deletes of B's rows touch nothing (or are not granted at all, as for the
            // append-only audit log): each in its own transaction, since a refusal aborts it.
            for statement in [
                "UPDATE \(table) SET \(column) = \(column) WHERE \(column) = $1 RETURNING 1",
                "DELETE FROM \(table) WHERE \(column) = $1 RETURNING 1",
            ] {
                var touched = 0
                let state = await sqlState {
                    touched = try await asApp(a.id) { connection in
                        var bindings = PostgresBindings()
                        bindings.append(b.id)
                        return try await connection.query(PostgresQuery(unsafeSQL: statement, binds: bindings), logger: env.logger)
                            .collect().count
                    }
                }
                #expect(touched == 0 && (state == nil || state == "42501"), "\(table): A changed B's rows with \(statement)")
            }
            // A cannot insert a row that belongs to B (a copy of one of B's rows).
            let row = try await asApp(b.id) { connection in
                let rows = try await connection.query("SELECT to_jsonb(t)::text FROM \(unescaped: table) t LIMIT 1", logger: env.logger)
                for try await json in rows.decode(String.self) { return json }
                return "{}"
            }
            let state = await insertState(table, row: row, as: a.id)
            #expect(state == "42501", "\(table): inserting B's row under A's context gave \(state ?? "success")")
            // A cannot move its own rows into B.
            let moveState = await sqlState {
                try await asApp(a.id) { connection in
                    _ = try await connection.query(
                        "UPDATE \(unescaped: table) SET \(unescaped: column) = \(b.id) WHERE \(unescaped: column) = \(a.id)",
                        logger: env.logger)
                }
            }
            // organisations.id is referenced by every other table, so moving it may fail on a key first; either way it fails.
            #expect(moveState != nil, "\(table): A moved its rows into B")
            if table != "organisations" { #expect(moveState == "42501", "\(table): moving A's rows to B gave \(moveState ?? "success")") }
        }
    }

    @Test("a row of A cannot reference B's rows: composite foreign keys refuse it")
    func compositeKeysRefuseCrossReferences() async throws {
        let a = try await populatedOrganisation()
        let b = try await populatedOrganisation()
        let tables = try await env.appClient.query(
            """
            SELECT DISTINCT c.conrelid::regclass::text FROM pg_constraint c
            WHERE c.contype = 'f' AND c.connamespace = 'public'::regnamespace AND c.confrelid <> 'public.organisations'::regclass
            """)
        var referencing: [String] = []
        for try await table in tables.decode(String.self) { referencing.append(table) }
        #expect(Set(referencing).isSuperset(of: ["user_roles", "group_members", "role_permissions", "api_keys", "refresh_tokens"]))
        for table in referencing {
            // Take one of B's rows, relabel it as A's (and give it a fresh id where it has one):
            // every reference in it still points at B's rows, which A's organisation does not have.
            let row = try await asApp(b.id) { connection in
                let rows = try await connection.query(
                    """
                    SELECT (to_jsonb(t) || jsonb_build_object('organisation_id', \(a.id.uuidString))
                            || CASE WHEN to_jsonb(t) ? 'id' THEN jsonb_build_object('id', gen_random_uuid()) ELSE '{}'::jsonb END
                            || CASE WHEN to_jsonb(t) ? 'key' THEN jsonb_build_object('key', 'x' || substr(md5(random()::text), 1, 12)) ELSE '{}'::jsonb END)::text
                    FROM \(unescaped: table) t LIMIT 1
                    """, logger: env.logger)
                for try await json in rows.decode(String.self) { return json }
                return "{}"
            }
            let state = await insertState(table, row: row, as: a.id)
            // A table the application role cannot insert into at all (digest_runs: only the
            // claim function makes its rows, from items of the same organisation) refuses first.
            let insertable = try await asApp(nil) { connection in
                try await connection.query("SELECT has_table_privilege(current_user, \(table), 'INSERT')", logger: env.logger)
                    .collect().first?.decode(Bool.self) ?? false
            }
            #expect(
                state == (insertable ? "23503" : "42501"), "\(table): a row of A referencing B's rows gave \(state ?? "success")")
        }
    }

    @Test(
        "a row naming an event or a user its organisation does not have is refused, and deleting either deletes its rows (0029, 0030)"
    )
    func referencesPerStatement() async throws {
        let a = try await populatedOrganisation()
        let b = try await populatedOrganisation()
        let (theirEvent, theirUser) = try await asApp(b.id) { connection in
            (
                try await connection.query("SELECT id FROM events LIMIT 1", logger: env.logger).collect()[0].decode(UUID.self),
                try await connection.query("SELECT id FROM users LIMIT 1", logger: env.logger).collect()[0].decode(UUID.self)
            )
        }
        let tables = ["notifications", "deliveries", "digest_items", "event_recipients"]
        for table in tables {
            for (column, value) in [("event_id", theirEvent), ("event_id", UUID()), ("user_id", theirUser), ("user_id", UUID())] {
                // One of A's own rows, naming B's event or user, or none at all.
                let row = try await asApp(a.id) { connection in
                    let rows = try await connection.query(
                        """
                        SELECT (to_jsonb(t) || jsonb_build_object(\(column), \(value.uuidString))
                                || CASE WHEN to_jsonb(t) ? 'id' THEN jsonb_build_object('id', gen_random_uuid()) ELSE '{}'::jsonb END)::text
                        FROM \(unescaped: table) t LIMIT 1
                        """, logger: env.logger)
                    for try await json in rows.decode(String.self) { return json }
                    return "{}"
                }
                let state = await insertState(table, row: row, as: a.id)
                #expect(state == "23503", "\(table): a row of A with \(column) \(value) gave \(state ?? "success")")
            }
        }
        // Deleting an event (retention does, as the worker) deletes its rows, as the keys' cascade did.
        let event = try await asApp(a.id) { connection in
            try await connection.query("SELECT event_id FROM digest_items LIMIT 1", logger: env.logger).collect()[0].decode(UUID.self)
        }
        try await env.workerClient.withTransaction(logger: env.logger) { connection in
            try await connection.query("SELECT set_config('app.org_id', \(a.id.uuidString), true)", logger: env.logger)
            try await connection.query("DELETE FROM events WHERE organisation_id = \(a.id) AND id = \(event)", logger: env.logger)
        }
        for table in tables {
            let left = try await asApp(a.id) { try await count($0, "SELECT count(*)::int FROM \(table) WHERE event_id =", event) }
            #expect(left == 0, "\(table): \(left) rows of a deleted event")
        }
        // And deleting a user deletes theirs.
        let before = try await asApp(a.id) {
            try await count($0, "SELECT count(*)::int FROM notifications WHERE user_id =", a.memberID)
        }
        #expect(before > 0)
        try await asApp(a.id) { connection in
            _ = try await connection.query("DELETE FROM users WHERE organisation_id = \(a.id) AND id = \(a.memberID)", logger: env.logger)
        }
        for table in tables {
            let left = try await asApp(a.id) { try await count($0, "SELECT count(*)::int FROM \(table) WHERE user_id =", a.memberID) }
            #expect(left == 0, "\(table): \(left) rows of a deleted user")
        }
    }

    @Test(
        "a statement's users are checked together: a missing one among many is named and nothing is written, and those found stay locked until commit (0030)"
    )
    func manyReferencesInOneStatement() async throws {
        let a = try await populatedOrganisation()
        let missing = UUID()
        // Rows for the member (two channels), one naming a user A does not have and one for the owner, in one statement.
        func insert(_ users: [UUID]) -> PostgresQuery {
            """
            INSERT INTO deliveries (organisation_id, id, event_id, user_id, channel, destination, next_attempt_at)
            SELECT \(a.id), gen_random_uuid(), (SELECT id FROM events LIMIT 1), u, c, 'someone@example.com', now()
            FROM unnest(\(users)::uuid[], \(users.indices.map { $0 % 2 == 0 ? "email" : "chat" })::text[]) AS r(u, c)
            """
        }
        let before = try await asApp(a.id) { try await count($0, "SELECT count(*)::int FROM deliveries") }
        var detail: String?
        do {
            _ = try await asApp(a.id) {
                try await $0.query(insert([a.memberID, a.memberID, missing, a.ownerID]), logger: env.logger).collect()
            }
        } catch let error as PSQLError {
            #expect(error.serverInfo?[.sqlState] == "23503")
            detail = error.serverInfo?[.detail]
        }
        #expect(detail?.contains(missing.uuidString.lowercased()) == true, "detail: \(detail ?? "no error")")
        #expect(try await asApp(a.id) { try await count($0, "SELECT count(*)::int FROM deliveries") } == before)

        // Found users are locked FOR KEY SHARE until the inserting transaction ends: deleting one waits.
        let deleteState = try await asApp(a.id) { connection in
            _ = try await connection.query(insert([a.memberID, a.memberID, a.ownerID]), logger: env.logger).collect()
            return await sqlState {
                try await asApp(a.id) { other in
                    try await other.query("SET LOCAL lock_timeout = '300ms'", logger: env.logger)
                    _ = try await other.query("DELETE FROM users WHERE organisation_id = \(a.id) AND id = \(a.ownerID)", logger: env.logger)
                }
            }
        }
        #expect(deleteState == "55P03", "deleting a user named by an uncommitted insert gave \(deleteState ?? "success")")
        #expect(try await asApp(a.id) { try await count($0, "SELECT count(*)::int FROM deliveries") } == before + 3)
    }

    @Test(
        "a chunk's users are probed once: a delivery whose trace row this transaction wrote is not checked again, and the trace's check keeps the user locked (0054)"
    )
    func usersCheckedOncePerChunk() async throws {
        let a = try await populatedOrganisation()
        // An event of A that reached the member only: the owner has no trace row for it.
        let (event, _) = try await a.notify(
            EventRequest(typeKey: "TASK_ASSIGNED", audience: Audience(userIDs: [a.memberID]), payload: .object(["title": .string("t")])))
        func delivery(_ user: UUID) -> PostgresQuery {
            """
            INSERT INTO deliveries (organisation_id, id, event_id, user_id, channel, destination, next_attempt_at)
            VALUES (\(a.id), gen_random_uuid(), \(event.id), \(user), 'email', 'someone@example.com', now())
            """
        }
        // The probes of users this transaction made so far.
        func userScans(_ connection: PostgresConnection) async throws -> Int {
            try await count(
                connection, "SELECT coalesce(sum(idx_scan + seq_scan), 0)::int FROM pg_stat_xact_user_tables WHERE relname = 'users'")
        }
        let deleteState = try await asApp(a.id) { connection in
            // The owner's trace row, written here: its check probes (and locks) the owner.
            _ = try await connection.query(
                """
                INSERT INTO event_recipients (organisation_id, event_id, user_id, category_id, targeted, rule, reason, notified)
                SELECT organisation_id, event_id, \(a.ownerID), category_id, targeted, rule, reason, notified FROM event_recipients
                WHERE organisation_id = \(a.id) AND event_id = \(event.id) AND user_id = \(a.memberID)
                """, logger: env.logger
            ).collect()
            let traced = try await userScans(connection)
            #expect(traced >= 1)
            // A delivery for the owner: its trace row is this transaction's, so users is not read again.
            _ = try await connection.query(delivery(a.ownerID), logger: env.logger).collect()
            #expect(try await userScans(connection) == traced, "a delivery whose trace row this transaction wrote probed users")
            // Nor for an in-app row of the owner.
            _ = try await connection.query(
                """
                INSERT INTO notifications (organisation_id, id, event_id, user_id, type_id, category_id, severity, priority, content_id,
                                           title, body, visible_at, expires_at)
                SELECT organisation_id, gen_random_uuid(), event_id, \(a.ownerID), type_id, category_id, severity, priority, content_id,
                       title, body, visible_at, expires_at
                FROM notifications WHERE organisation_id = \(a.id) AND event_id = \(event.id) AND user_id = \(a.memberID)
                """, logger: env.logger
            ).collect()
            #expect(try await userScans(connection) == traced, "an in-app row whose trace row this transaction wrote probed users")
            // One for the member, whose trace row an earlier transaction wrote: probed (and locked) as before.
            _ = try await connection.query(delivery(a.memberID), logger: env.logger).collect()
            #expect(try await userScans(connection) > traced)
            // The owner stays locked until the commit: deleting them waits.
            return await sqlState {
                try await asApp(a.id) { other in
                    try await other.query("SET LOCAL lock_timeout = '300ms'", logger: env.logger)
                    _ = try await other.query("DELETE FROM users WHERE organisation_id = \(a.id) AND id = \(a.ownerID)", logger: env.logger)
                }
            }
        }
        #expect(deleteState == "55P03", "deleting a user named by an uncommitted trace row gave \(deleteState ?? "success")")
    }

    @Test(
        "a chunk's deliveries are checked against the trace rows in the chunk's range only; a user traced by an earlier transaction is still locked, one the organisation does not have refused (0056)"
    )
    func ownTraceRowsReadAsARange() async throws {
        let a = try await populatedOrganisation()
        // 300 users more, and an event that reached them all: 300 trace rows of another event that
        // a scan of the table, as the first version of 0054 made, would read.
        let users: [UUID] = (0..<300).map { _ in UUID() }
        try await asApp(a.id) { connection in
            _ = try await connection.query(
                """
                INSERT INTO users (organisation_id, id, email, display_name)
                SELECT \(a.id), id, 'range-' || id || '@example.com', 'Range' FROM unnest(\(users)::uuid[]) id
                """, logger: env.logger
            ).collect()
        }
        _ = try await a.notify(
            EventRequest(typeKey: "TASK_ASSIGNED", audience: Audience(userIDs: users), payload: .object(["title": .string("t")])))
        // Statistics that know those rows, as autovacuum's would. (On tables this small the planner
        // takes the index even for the unguarded form of the check; the bench's database, with a
        // million trace rows, is where a scan of the whole table showed: docs/benchmarks.md.)
        try await CitusReadinessTests.withClient(env.ownerURL, env.logger) {
            _ = try await $0.query("ANALYZE event_recipients", logger: env.logger)
        }
        // An event that reached the member only (its trace row committed), and a chunk of the new
        // users around the member in id order, whose trace rows are written here: the member's
        // committed row lies inside the chunk's range.
        let (event, _) = try await a.notify(
            EventRequest(typeKey: "TASK_ASSIGNED", audience: Audience(userIDs: [a.memberID]), payload: .object(["title": .string("t")])))
        let ordered = (users + [a.memberID]).sorted { $0.uuidString.lowercased() < $1.uuidString.lowercased() }
        let at = try #require(ordered.firstIndex(of: a.memberID))
        let window = Array(ordered[max(0, min(at - 2, ordered.count - 5))...].prefix(5))
        let chunk = window.filter { $0 != a.memberID }
        let (read, lockState, missingState) = try await asApp(a.id) { connection in
            _ = try await connection.query(
                """
                INSERT INTO event_recipients (organisation_id, event_id, user_id, category_id, targeted, rule, reason, notified)
                SELECT t.organisation_id, t.event_id, u, t.category_id, t.targeted, t.rule, t.reason, t.notified
                FROM event_recipients t, unnest(\(chunk)::uuid[]) u
                WHERE t.organisation_id = \(a.id) AND t.event_id = \(event.id) AND t.user_id = \(a.memberID)
                """, logger: env.logger
            ).collect()
            func traceRowsRead() async throws -> Int {
                try await count(
                    connection,
                    "SELECT coalesce(sum(seq_tup_read + idx_tup_fetch), 0)::int FROM pg_stat_xact_user_tables WHERE relname = 'event_recipients'"
                )
            }
            let before = try await traceRowsRead()
            _ = try await connection.query(
                """
                INSERT INTO deliveries (organisation_id, id, event_id, user_id, channel, destination, next_attempt_at)
                SELECT \(a.id), gen_random_uuid(), \(event.id), u, 'email', 'someone@example.com', now() FROM unnest(\(window)::uuid[]) u
                """, logger: env.logger
            ).collect()
            let read = try await traceRowsRead() - before
            // The member's trace row is an earlier transaction's: the member was probed and stays
            // locked until this commits, so deleting them waits.
            let lockState = await sqlState {
                try await asApp(a.id) { other in
                    try await other.query("SET LOCAL lock_timeout = '300ms'", logger: env.logger)
                    _ = try await other.query(
                        "DELETE FROM users WHERE organisation_id = \(a.id) AND id = \(a.memberID)", logger: env.logger)
                }
            }
            // A delivery beside them for a user with no trace row for the event and none in the
            // organisation: refused, and the statement's other rows with it.
            let state = await sqlState {
                _ = try await connection.query(
                    """
                    INSERT INTO deliveries (organisation_id, id, event_id, user_id, channel, destination, next_attempt_at)
                    SELECT \(a.id), gen_random_uuid(), \(event.id), u, 'email', 'someone@example.com', now()
                    FROM unnest(\(chunk + [UUID()])::uuid[]) u
                    """, logger: env.logger
                ).collect()
            }
            return (read, lockState, state)
        }
        // The range holds the window's rows: the four written here and the member's.
        #expect(read >= window.count - 1 && read <= window.count, "the check of \(window.count) deliveries read \(read) trace rows")
        #expect(lockState == "55P03", "deleting a user whose trace row an earlier transaction wrote gave \(lockState ?? "success")")
        #expect(missingState == "23503")
    }

    @Test("audience_members lists a user's role and group keys once each, in key order (0055)")
    func audienceKeysInOrder() async throws {
        let a = try await populatedOrganisation()
        let (roles, groups) = try await asApp(a.id) { connection in
            // The member in groups "zz" and "g1" and "aa", and holding "admin" beside their own role.
            _ = try await connection.query(
                """
                WITH g AS (INSERT INTO groups (organisation_id, key, name) VALUES (\(a.id), 'zz', 'Z'), (\(a.id), 'aa', 'A') RETURNING id)
                INSERT INTO group_members (organisation_id, group_id, user_id) SELECT \(a.id), id, \(a.memberID) FROM g
                """, logger: env.logger
            ).collect()
            _ = try await connection.query(
                """
                INSERT INTO user_roles (organisation_id, user_id, role_id)
                SELECT \(a.id), \(a.memberID), id FROM roles WHERE organisation_id = \(a.id) AND key = 'admin'
                ON CONFLICT DO NOTHING
                """, logger: env.logger
            ).collect()
            let rows = try await connection.query(
                """
                SELECT role_keys, group_keys FROM audience_members(\(a.id), false, '{}', ARRAY['member', 'admin', 'member'],
                                                                ARRAY['zz', 'g1', 'aa', 'g1'], NULL, NULL)
                WHERE user_id = \(a.memberID)
                """, logger: env.logger)
            for try await pair in rows.decode(([String], [String]).self) { return pair }
            return ([], [])
        }
        #expect(groups == ["aa", "g1", "zz"])
        #expect(roles == ["admin", "member"])
    }

    @Test(
        "the feed's change log is written by Herald's own functions only: the application role can neither write it nor call its logger (0019)"
    )
    func changeLogClosed() async throws {
        let org = try await populatedOrganisation()
        let statements: [PostgresQuery] = [
            "INSERT INTO feed_changes (organisation_id, user_id, seq, kind) VALUES (\(org.id), \(org.memberID), 1000, 'read_all')",
            "INSERT INTO feed_streams (organisation_id, user_id, seq) VALUES (\(org.id), \(org.memberID), 1000)",
            "UPDATE feed_streams SET seq = seq + 1",
            "SELECT log_feed_changes(ARRAY[\(org.id)]::uuid[], ARRAY[\(org.memberID)]::uuid[], ARRAY['read_all'], ARRAY[NULL]::uuid[])",
        ]
        for statement in statements {
            let state = await sqlState {
                _ = try await asApp(org.id) { try await $0.query(statement, logger: env.logger).collect().count }
            }
            #expect(state == "42501", "\(statement.sql)")
        }
    }

    @Test("the audit log is append-only for the application role")
    func auditAppendOnly() async throws {
        let org = try await populatedOrganisation()
        let update = await sqlState {
            _ = try await asApp(org.id) { try await $0.query("UPDATE audit_log SET action = 'x'", logger: env.logger).collect().count }
        }
        let delete = await sqlState {
            _ = try await asApp(org.id) { try await $0.query("DELETE FROM audit_log", logger: env.logger).collect().count }
        }
        #expect(update == "42501")
        #expect(delete == "42501")
    }
}
