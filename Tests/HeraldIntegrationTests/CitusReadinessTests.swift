import Foundation
import HTTPTypes
import HeraldCore
import Hummingbird
import HummingbirdTesting
import Logging
import NIOCore
import PostgresNIO
import Testing

@testable import HeraldAPI
@testable import HeraldDelivery
@testable import HeraldStore

/// Issue 9, part 6: ready for a distributed PostgreSQL (Citus, every tenant table distributed by
/// organisation_id). A statement that names its organisation goes to one shard; one that does
/// not goes to every shard. On a database of its own (the shared test database hears every
/// suite at once), this suite migrates with `herald migrate` run from another directory, makes
/// an organisation with the demo catalogue (`herald organisation create`), runs a representative
/// workload through the real API and the delivery workers, then reads what the application and
/// worker roles sent (pg_stat_statements) and requires organisation_id in every statement that
/// touches a tenant table.
@Suite("Ready for a distributed PostgreSQL")
struct CitusReadinessTests {
    let env: TestEnvironment

    init() async throws {
        env = try await TestEnvironment.shared
    }

    /// The only tenant tables whose statements need not say organisation_id, and why.
    /// (The cross-tenant SECURITY DEFINER functions need no entry: a call of claim_deliveries or
    /// organisation_id_for_slug names no tenant table, and the statements inside them run as the
    /// owner, not as herald_app or herald_worker.)
    static let exemptTables: [String: String] = [
        // Its key `id` is the organisation id itself: every statement on it filters `id = $org`.
        // On Citus it is the reference table the tenant tables point at.
        "organisations": "keyed by id, which is the organisation id"
    ]

    @Test("every statement the API and the workers send to a tenant table names organisation_id")
    func everyStatementNamesItsOrganisation() async throws {
        // setup: a fresh database of this test's own (the owner role may create databases)
        let name = "citus_ready_\(UUID().uuidString.prefix(8).lowercased())"
        try await withClient(env.ownerURL) { try await $0.query("CREATE DATABASE \(unescaped: name)", logger: env.logger) }
        let drop: () async -> Void = {
            try? await withClient(env.ownerURL) {
                _ = try await $0.query("DROP DATABASE \(unescaped: name) WITH (FORCE)", logger: env.logger)
            }
        }
        do {
            try await runAndCheck(database: name)
        } catch {
            await drop()
            throw error
        }
        await drop()
    }

    func runAndCheck(database name: String) async throws {
        // setup: migrated from /tmp by the binary (the migrations come with the build)
        let migrated = try await herald(["migrate"], ["DATABASE_OWNER_URL": url(env.ownerURL, database: name)])
        #expect(migrated.contains("applied"), "herald migrate from /tmp: \(migrated)")
        let slug = "citus-\(UUID().uuidString.prefix(6).lowercased())"
        let password = "correct horse battery staple"
        _ = try await herald(
            [
                "organisation", "create", "--slug", slug, "--name", "Citus Clinic", "--owner-email", "owner@\(slug).example",
                "--catalogue", "demo",
            ],
            ["DATABASE_URL": url(env.appURL, database: name), "HERALD_OWNER_PASSWORD": password])

        // act: the workload, through the API and the workers, as herald_app and herald_worker
        var workerConfiguration = try PostgresClient.Configuration.fromURL(url(env.workerURL, database: name))
        workerConfiguration.options.maximumConnections = 20
        let appClient = PostgresClient(configuration: try .fromURL(url(env.appURL, database: name)), backgroundLogger: env.logger)
        let workerClient = PostgresClient(configuration: workerConfiguration, backgroundLogger: env.logger)
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { await appClient.run() }
            group.addTask { await workerClient.run() }
            defer { group.cancelAll() }
            try await workload(slug: slug, password: password, app: appClient, workers: workerClient)
        }

        // check: every statement of the two roles on a tenant table says organisation_id
        let tenantTables = try await tenantTables(in: name)
        #expect(tenantTables.count >= 20)
        let statements = try await statements(in: name)
        var touched = Set<String>()
        var offenders: [String] = []
        for (query, role) in statements {
            let tables = Self.tables(tenantTables, namedIn: query)
            touched.formUnion(tables)
            if Self.needsOrganisation(query, tables: tables) {
                offenders.append("[\(role)] \(query.split(whereSeparator: \.isWhitespace).joined(separator: " "))")
            }
        }
        #expect(statements.count >= 50, "pg_stat_statements saw only \(statements.count) statements: is it loaded?")
        #expect(offenders.isEmpty, "statements on tenant tables without organisation_id:\n\(offenders.sorted().joined(separator: "\n"))")
        // The workload is representative: it reached every tenant table.
        // feed_due is written by a trigger on notifications and read by feed_stream_sweep()
        // only (migration 0010, which names organisation_id throughout): no statement names it.
        let untouched = Set(tenantTables).subtracting(touched).subtracting(["feed_due"])
        #expect(untouched.isEmpty, "the workload never touched \(untouched.sorted())")
    }

    /// The tables of `candidates` that `query` names as a word (`claim_deliveries` does not
    /// name `deliveries`; `d.user_id` does not name `users`).
    static func tables(_ candidates: [String], namedIn query: String) -> [String] {
        candidates.filter { table in
            query.contains(try! Regex("\\b\(table)\\b").ignoresCase().wordBoundaryKind(.simple))
        }
    }

    /// A statement on a tenant table that does not say organisation_id: Citus sends it to every shard.
    static func needsOrganisation(_ query: String, tables: [String]) -> Bool {
        !tables.isEmpty && !query.contains("organisation_id")
    }

    @Test("the statement check sees a tenant table however it is written, and only a whole name")
    func statementCheckRecognisesTables() {
        let tables = ["deliveries", "feed_state", "users"]
        #expect(Self.tables(tables, namedIn: "UPDATE deliveries SET status = $1 WHERE id = $2") == ["deliveries"])
        #expect(Self.tables(tables, namedIn: "SELECT feed_state.read_through FROM FEED_STATE") == ["feed_state"])
        #expect(Self.tables(tables, namedIn: "SELECT organisation_id, delivery_id FROM claim_deliveries($1, $2)").isEmpty)
        #expect(Self.tables(tables, namedIn: "SELECT d.user_id FROM x d").isEmpty)
        #expect(Self.needsOrganisation("DELETE FROM users WHERE id = $1", tables: ["users"]))
        #expect(!Self.needsOrganisation("DELETE FROM users WHERE organisation_id = $1 AND id = $2", tables: ["users"]))
    }

    // MARK: The workload

    func workload(slug: String, password: String, app appClient: PostgresClient, workers workerClient: PostgresClient) async throws {
        let database = Database(client: appClient, logger: env.logger)
        let dependencies = AppDependencies(
            database: database, postgres: appClient, tokens: env.tokens, passwords: env.passwords,
            expectedMigrations: TestEnvironment.migrationVersions, linkKeys: TestEnvironment.linkKeys)
        let router = try buildRouter(
            configuration: env.configuration { $0.destinationsAllowed = ["127.0.0.1/32"] }, dependencies: dependencies)
        let app = Application(router: router, configuration: .init(address: .hostname("127.0.0.1", port: 0)), logger: env.logger)
        let hook = Peers.hook("citus")
        try await app.test(.router) { client in
            // Sessions: login, refresh, logout.
            let login = try ok(
                await client.send(
                    .post, "/v1/auth/token",
                    json: """
                        {"organisation": "\(slug)", "email": "owner@\(slug).example", "password": "\(password)"}
                        """), "login")
            let admin = try #require(login["access_token"] as? String)
            let refreshed = try ok(
                await client.send(.post, "/v1/auth/refresh", json: #"{"refresh_token": "\#(login["refresh_token"] as? String ?? "")"}"#),
                "refresh")
            // The access token works while its session lives; a logout ends it (and its tokens):
            // the calls below use the first session's token, so a second session logs out.
            _ = try ok(await client.send(.get, "/v1/me", token: try #require(refreshed["access_token"] as? String)), "me, refreshed")
            let second = try ok(
                await client.send(
                    .post, "/v1/auth/token",
                    json: """
                        {"organisation": "\(slug)", "email": "owner@\(slug).example", "password": "\(password)"}
                        """), "second login")
            _ = try ok(
                await client.send(.post, "/v1/auth/logout", json: #"{"refresh_token": "\#(second["refresh_token"] as? String ?? "")"}"#),
                "logout")
            let me = try ok(await client.send(.get, "/v1/me", token: admin), "me")
            let ownerID = try #require(me["user_id"] as? String)
            let organisationID = try #require((me["organisation_id"] as? String).flatMap(UUID.init(uuidString:)))
            _ = try ok(await client.send(.get, "/v1/organisation", token: admin), "organisation")
            _ = try ok(await client.send(.get, "/v1/permissions", token: admin), "permissions")
            _ = try ok(
                await client.send(.patch, "/v1/organisation", token: admin, json: #"{"default_timezone": "Europe/Paris"}"#),
                "update organisation")

            // Users and roles.
            let memberEmail = "member@\(slug).example"
            let memberID = try #require(
                try ok(
                    await client.send(.post, "/v1/users", token: admin, json: #"{"email": "\#(memberEmail)", "display_name": "Member"}"#),
                    "create user")["id"] as? String)
            let tempID = try #require(
                try ok(
                    await client.send(
                        .post, "/v1/users", token: admin, json: #"{"email": "temp@\#(slug).example", "display_name": "Temp"}"#),
                    "create user")["id"] as? String)
            _ = try ok(
                await client.send(
                    .patch, "/v1/users/\(memberID)", token: admin,
                    json: #"{"display_name": "Member M", "attributes": {"team": "implants"}}"#), "update user")
            _ = try ok(await client.send(.post, "/v1/users/\(tempID)/deactivate", token: admin), "deactivate")
            _ = try ok(await client.send(.post, "/v1/users/\(tempID)/reactivate", token: admin), "reactivate")
            _ = try ok(await client.send(.get, "/v1/users?q=member&active=true", token: admin), "search users")
            _ = try ok(await client.send(.get, "/v1/users/\(memberID)", token: admin), "user")
            let roles = try #require(try ok(await client.send(.get, "/v1/roles", token: admin), "roles")["items"] as? [[String: Any]])
            func role(_ key: String) throws -> String {
                try #require(roles.first { $0["key"] as? String == key }?["id"] as? String, "role \(key)")
            }
            let (memberRole, ownerRole, clinician, service) = (
                try role("member"), try role("owner"), try role("clinician"), try role("service")
            )
            _ = try ok(
                await client.send(
                    .put, "/v1/users/\(memberID)/roles", token: admin, json: #"{"role_ids": ["\#(memberRole)", "\#(clinician)"]}"#),
                "member roles")
            _ = try ok(
                await client.send(
                    .put, "/v1/users/\(ownerID)/roles", token: admin, json: #"{"role_ids": ["\#(ownerRole)", "\#(clinician)"]}"#),
                "owner roles")
            let auditor = try #require(
                try ok(
                    await client.send(
                        .post, "/v1/roles", token: admin, json: #"{"key": "auditor", "name": "Auditor", "permissions": ["audit.read"]}"#),
                    "create role")["id"] as? String)
            _ = try ok(
                await client.send(
                    .patch, "/v1/roles/\(auditor)", token: admin,
                    json: #"{"name": "Auditors", "permissions": ["audit.read", "users.read"]}"#), "update role")
            _ = try ok(await client.send(.get, "/v1/roles/\(auditor)", token: admin), "role")
            #expect(try await client.send(.delete, "/v1/roles/\(auditor)", token: admin).status == .noContent)

            // Groups.
            let group = try #require(
                try ok(await client.send(.post, "/v1/groups", token: admin, json: #"{"key": "ward-7", "name": "Ward 7"}"#), "create group")[
                    "id"] as? String)
            #expect(try await client.send(.put, "/v1/groups/\(group)/members/\(memberID)", token: admin).status == .noContent)
            #expect(try await client.send(.put, "/v1/groups/\(group)/members/\(tempID)", token: admin).status == .noContent)
            _ = try ok(await client.send(.get, "/v1/groups/\(group)/members", token: admin), "members")
            _ = try ok(
                await client.send(.patch, "/v1/groups/\(group)", token: admin, json: #"{"description": "Night shift"}"#), "update group")
            _ = try ok(await client.send(.get, "/v1/groups", token: admin), "groups")
            #expect(try await client.send(.delete, "/v1/groups/\(group)/members/\(tempID)", token: admin).status == .noContent)

            // API keys: made, used, revoked.
            let key = try ok(
                await client.send(.post, "/v1/api-keys", token: admin, json: #"{"name": "CRM", "role_id": "\#(service)"}"#), "create key")
            let keyID = try #require(key["id"] as? String), secret = try #require(key["secret"] as? String)
            _ = try ok(await client.send(.get, "/v1/api-keys", token: admin), "keys")
            _ = try ok(await client.send(.get, "/v1/api-keys/\(keyID)", token: admin), "key")
            _ = try ok(await client.send(.get, "/v1/events", token: secret), "events with a key")

            // Catalogue: a category and a type with templates; the catalogue document round trip.
            _ = try ok(await client.send(.get, "/v1/categories", token: admin), "categories")
            let wards = try #require(
                try ok(
                    await client.send(.post, "/v1/categories", token: admin, json: #"{"key": "wards", "name": "Wards"}"#), "create category"
                )["id"] as? String)
            _ = try ok(
                await client.send(.patch, "/v1/categories/\(wards)", token: admin, json: #"{"description": "Ward systems"}"#),
                "update category")
            let type = try #require(
                try ok(
                    await client.send(
                        .post, "/v1/notification-types", token: admin,
                        json: """
                            {"key": "WARD_ALERT", "category": "wards", "name": "Ward alert", "default_channels": ["in_app", "email", "webhook"]}
                            """), "create type")["id"] as? String)
            _ = try ok(
                await client.send(
                    .put, "/v1/notification-types/\(type)/templates/in_app/en", token: admin,
                    json: #"{"subject": "Ward {{payload.ward}}", "body": "Alert"}"#), "template")
            _ = try ok(
                await client.send(
                    .put, "/v1/notification-types/\(type)/templates/email/en", token: admin,
                    json: #"{"subject": "Ward {{payload.ward}}", "body": "Open: {{{links.open}}}"}"#), "template")
            _ = try ok(
                await client.send(
                    .put, "/v1/notification-types/\(type)/templates/in_app/fr", token: admin,
                    json: #"{"subject": "Service", "body": "Alerte"}"#), "template")
            #expect(try await client.send(.delete, "/v1/notification-types/\(type)/templates/in_app/fr", token: admin).status == .noContent)
            _ = try ok(await client.send(.get, "/v1/notification-types", token: admin), "types")
            _ = try ok(await client.send(.get, "/v1/notification-types/\(type)", token: admin), "type")
            let scratch = try #require(
                try ok(
                    await client.send(.post, "/v1/categories", token: admin, json: #"{"key": "scratch", "name": "Scratch"}"#),
                    "create category")["id"] as? String)
            let scratchType = try #require(
                try ok(
                    await client.send(
                        .post, "/v1/notification-types", token: admin,
                        json: #"{"key": "SCRATCH", "category": "scratch", "name": "Scratch"}"#), "create type")["id"] as? String)
            #expect(try await client.send(.delete, "/v1/notification-types/\(scratchType)", token: admin).status == .noContent)
            #expect(try await client.send(.delete, "/v1/categories/\(scratch)", token: admin).status == .noContent)
            let document = try await client.send(.get, "/v1/catalogue", token: admin)
            #expect(document.status == .ok)
            _ = try ok(await client.send(.put, "/v1/catalogue", token: admin, json: document.text), "import catalogue")

            // Preferences: organisation defaults, the owner's own, the member's set by an admin.
            _ = try ok(await client.send(.get, "/v1/organisation/preference-defaults", token: admin), "defaults")
            _ = try ok(
                await client.send(
                    .put, "/v1/organisation/preference-defaults", token: admin,
                    json: #"{"items": [{"category": "activity", "channel": "email", "enabled": true, "frequency": "DAILY"}]}"#),
                "set defaults")
            _ = try ok(
                await client.send(
                    .put, "/v1/me/preferences", token: admin,
                    json: #"{"items": [{"category": "outings", "channel": "email", "enabled": true, "frequency": "WEEKLY"}]}"#),
                "my preferences")
            _ = try ok(await client.send(.get, "/v1/me/preferences", token: admin), "my preferences")
            _ = try ok(await client.send(.get, "/v1/me/preferences/resolved", token: admin), "resolved")
            _ = try ok(
                await client.send(
                    .put, "/v1/users/\(memberID)/preferences", token: admin,
                    json: #"{"items": [{"category": "wards", "channel": "email", "enabled": true, "frequency": "IMMEDIATE"}]}"#),
                "user preferences")
            _ = try ok(await client.send(.get, "/v1/users/\(memberID)/preferences", token: admin), "user preferences")
            _ = try ok(await client.send(.get, "/v1/users/\(memberID)/preferences/resolved?type=WARD_ALERT", token: admin), "resolved")

            // A webhook endpoint at the test receiver.
            let endpoint = try #require(
                try ok(
                    await client.send(
                        .post, "/v1/endpoints", token: admin,
                        json: #"{"channel": "webhook", "name": "Ward system", "url": "\#(hook.url)"}"#), "endpoint")["id"] as? String)
            _ = try ok(await client.send(.get, "/v1/endpoints", token: admin), "endpoints")
            _ = try ok(
                await client.send(.patch, "/v1/endpoints/\(endpoint)", token: admin, json: #"{"name": "Ward system 7"}"#), "update endpoint"
            )
            _ = try ok(await client.send(.post, "/v1/endpoints/\(endpoint)/rotate-secret", token: admin), "rotate")
            _ = try ok(await client.send(.get, "/v1/endpoints/\(endpoint)", token: admin), "endpoint")

            // Notify: by role (idempotent replay), by user with a link, everyone (digest), later (cancelled).
            let idempotency: HTTPFields = [HTTPField.Name("Idempotency-Key")!: "citus-1"]
            let isq = #"{"type": "ISQ_CRITICAL", "audience": {"roles": ["clinician"]}, "payload": {"isq": 25, "threshold": 55}}"#
            _ = try ok(await client.send(.post, "/v1/events/dry-run", token: admin, json: isq), "dry run")
            let first = try #require(
                try ok(await client.send(.post, "/v1/events", token: admin, json: isq, headers: idempotency), "notify")["event_id"]
                    as? String)
            _ = try ok(await client.send(.post, "/v1/events", token: admin, json: isq, headers: idempotency), "replay")
            _ = try ok(
                await client.send(
                    .post, "/v1/events", token: admin,
                    json: """
                        {"type": "WARD_ALERT", "audience": {"user_ids": ["\(memberID)"]}, "payload": {"ward": "7"}, "url": "https://ward.example.org/7"}
                        """), "notify by user")
            _ = try ok(
                await client.send(
                    .post, "/v1/events", token: admin,
                    json: """
                        {"type": "TASK_ASSIGNED", "audience": {"everyone": true, "groups": ["ward-7"]}, "payload": {"title": "Round", "due": "today"}}
                        """), "notify everyone")
            let later = ISO8601DateFormatter().string(from: Date().addingTimeInterval(3600))
            let future = try #require(
                try ok(
                    await client.send(
                        .post, "/v1/events", token: admin,
                        json: """
                            {"type": "WARD_ALERT", "audience": {"user_ids": ["\(memberID)"]}, "payload": {"ward": "8"}, "deliver_at": "\(later)"}
                            """), "notify later")["event_id"] as? String)
            let held = try #require(
                try ok(
                    await client.send(
                        .post, "/v1/events", token: admin,
                        json: """
                            {"type": "WARD_ALERT", "audience": {"user_ids": ["\(ownerID)"]}, "payload": {"ward": "9"}, "deliver_at": "\(later)"}
                            """), "notify later")["event_id"] as? String)
            _ = try ok(await client.send(.post, "/v1/events/\(future)/cancel", token: admin), "cancel event")
            _ = try ok(await client.send(.get, "/v1/events?type=ISQ_CRITICAL", token: admin), "events")
            _ = try ok(await client.send(.get, "/v1/events/\(first)", token: admin), "event")
            _ = try ok(await client.send(.get, "/v1/events/\(first)/explain", token: admin), "explain")
            _ = try ok(await client.send(.get, "/v1/notifications/stats", token: admin), "stats")

            // A recurring schedule, paused and resumed, and one occurrence sent as `herald serve`
            // sends it (the application role), two days ahead on its clock.
            let schedule = try ok(
                await client.send(
                    .post, "/v1/schedules", token: admin,
                    json: """
                        {"name": "Round", "rule": "FREQ=DAILY;BYHOUR=7", "event": {"type": "TASK_ASSIGNED", "audience": {"groups": ["ward-7"]}, "payload": {"title": "Round", "due": "today"}}}
                        """), "schedule")
            let scheduleID = try #require(schedule["id"] as? String)
            _ = try ok(await client.send(.get, "/v1/schedules", token: admin), "schedules")
            _ = try ok(await client.send(.post, "/v1/schedules/\(scheduleID)/pause", token: admin), "pause schedule")
            _ = try ok(await client.send(.post, "/v1/schedules/\(scheduleID)/resume", token: admin), "resume schedule")
            let twoDaysOn = Date().addingTimeInterval(2 * 86_400)
            let occurrences = WorkRunner(
                configuration: WorkRunnerConfiguration(name: "citus-schedules"),
                queue: ScheduleQueue(database: database, organisation: organisationID, now: { twoDaysOn }),
                handler: ScheduleHandler(database: database, worker: "citus-schedules", now: { twoDaysOn }),
                bus: NotificationBus(client: appClient, logger: env.logger), logger: env.logger)
            #expect(try await occurrences.runDue() == 1)
            _ = try ok(await client.send(.get, "/v1/schedules/\(scheduleID)", token: admin), "schedule")

            // The workers send what is due (email, webhook) under the worker role.
            let workerDatabase = Database(client: workerClient, logger: env.logger)
            try await TestWorkers.run(organisationID, database: workerDatabase, listenClient: workerClient) {
                let settled = try await eventually(timeout: .seconds(60)) {
                    try await database.withTenant(organisationID) { tx in
                        try await tx.deliveries(DeliveryFilter(), limit: 1000, after: nil).items
                            .allSatisfy {
                                $0.status == .sent || $0.status == .dead || $0.nextAttemptAt > Date().addingTimeInterval(60)
                                    || $0.status == .cancelled
                            }
                    }
                }
                #expect(settled, "deliveries did not settle")
            }
            // The digests of the next week go out under the worker role too (issue 11): the
            // daily activity digests of the round above.
            let nextWeek: @Sendable () -> Date = { Date().addingTimeInterval(8 * 86400) }
            let digestQueue = DigestQueue(database: workerDatabase, organisation: organisationID, now: nextWeek)
            let digestRunner = WorkRunner(
                configuration: WorkRunnerConfiguration(name: "citus-digest"), queue: digestQueue,
                handler: DigestHandler(
                    database: workerDatabase,
                    email: EmailTransport(
                        settings: EmailTransport.settings(url: Peers.smtpURL, username: nil, password: nil, timeout: 10)!,
                        defaultFrom: "herald@herald.test"),
                    links: LinkBuilder(baseURL: "http://herald.test", keys: TestEnvironment.linkKeys), retry: RetryPolicy(),
                    worker: "citus-digest", now: nextWeek),
                bus: NotificationBus(client: workerClient, logger: env.logger), logger: env.logger)
            let digestClaims = try await digestQueue.claim(worker: "citus-digest", limit: 100, leaseSeconds: 60)
            #expect(!digestClaims.isEmpty, "no digest run was due")
            for claim in digestClaims { await digestRunner.perform(claim) }

            let deliveries = try #require(
                try ok(await client.send(.get, "/v1/deliveries", token: admin), "deliveries")["items"] as? [[String: Any]])
            #expect(
                deliveries.contains { $0["channel"] as? String == "webhook" && $0["status"] as? String == "SENT" }, "no webhook was sent")
            _ = try ok(await client.send(.get, "/v1/deliveries/stats", token: admin), "delivery stats")
            let waiting = try #require(deliveries.first { $0["status"] as? String == "PENDING" }?["id"] as? String, "the later delivery")
            _ = try ok(await client.send(.get, "/v1/deliveries/\(waiting)", token: admin), "delivery")
            _ = try ok(await client.send(.post, "/v1/deliveries/\(waiting)/cancel", token: admin), "cancel delivery")
            _ = try ok(await client.send(.post, "/v1/deliveries/\(waiting)/retry", token: admin), "retry delivery")
            _ = held

            // The member follows the email's tracked link and unsubscribes in one click.
            let mails = try await Peers.mail(to: memberEmail)
            let raw = try #require(mails.compactMap { $0["data"] as? String }.first { $0.contains("/v1/links/") }, "the ward email")
            let text = try ParsedMail(raw).parts["text/plain"] ?? raw
            let open = try #require(text.firstMatch(of: /http:\/\/herald\.test(\/v1\/links\/[A-Za-z0-9._-]+)/)).1
            #expect(try await client.send(.get, String(open)).status == .found)
            let unsubscribe = try #require(try ParsedMail(raw).headers["List-Unsubscribe"])
            let unsubscribePath = String(unsubscribe.dropFirst("<http://herald.test".count).dropLast())
            #expect(try await client.send(.get, unsubscribePath).status == .ok)
            let oneClick = try await client.execute(
                uri: unsubscribePath, method: .post, headers: [.contentType: "application/x-www-form-urlencoded"],
                body: ByteBuffer(string: "List-Unsubscribe=One-Click"))
            #expect(oneClick.status == .ok)

            // The member's feed.
            let member = try await env.tokens.issueAccessToken(
                organisationID: organisationID, userID: try #require(UUID(uuidString: memberID)), now: Date())
            let feed = try #require(
                try ok(await client.send(.get, "/v1/me/notifications", token: member), "feed")["items"] as? [[String: Any]])
            let ids = feed.compactMap { $0["id"] as? String }
            try #require(ids.count >= 3, "the member's feed: \(feed)")
            _ = try ok(await client.send(.get, "/v1/me/notifications?read=false&q=ward&type=WARD_ALERT", token: member), "filtered feed")
            _ = try ok(await client.send(.get, "/v1/me/notifications/unread-count", token: member), "unread count")
            _ = try ok(await client.send(.get, "/v1/me/notifications/stats", token: member), "my stats")
            _ = try ok(await client.send(.get, "/v1/me/notifications/\(ids[0])", token: member), "one")
            _ = try ok(await client.send(.post, "/v1/me/notifications/\(ids[0])/read", token: member), "read")
            _ = try ok(await client.send(.post, "/v1/me/notifications/\(ids[0])/unread", token: member), "unread")
            _ = try ok(await client.send(.post, "/v1/me/notifications/\(ids[1])/archive", token: member), "archive")
            _ = try ok(
                await client.send(.post, "/v1/me/notifications/mark-read", token: member, json: #"{"ids": ["\#(ids[2])"]}"#), "mark read")
            _ = try ok(await client.send(.post, "/v1/me/notifications/mark-read", token: member, json: #"{"all": true}"#), "mark all read")
            _ = try ok(await client.send(.get, "/v1/me/notifications/unread-count", token: member), "unread count")
            _ = try ok(await client.send(.get, "/v1/events/\(first)/explain", token: admin), "explain after reading")
            #expect(try await client.send(.delete, "/v1/me/notifications/\(ids[0])", token: member).status == .noContent)
            _ = try ok(await client.send(.delete, "/v1/me/notifications", token: member), "clear")

            // Live streams: a ticket, redeemed by the stream route (503 here: this application
            // runs no stream hub), then the reads a stream makes, as it makes them.
            let ticket = try #require(
                try ok(await client.send(.post, "/v1/me/stream-tickets", token: member), "ticket")["ticket"] as? String)
            #expect(try await client.send(.get, "/v1/me/notifications/stream?ticket=\(ticket)").status == .serviceUnavailable)
            let memberUUID = try #require(UUID(uuidString: memberID))
            try await database.withTenant(organisationID, actor: .user(memberUUID), recipient: memberUUID) { tx in
                let position = try await tx.feedStreamPosition(of: memberUUID)
                _ = try await tx.feedChanges(of: memberUUID, after: max(0, position.seq - 5), limit: 100, now: Date())
            }

            // The audit trail, then the endpoint goes (its deliveries keep their history).
            _ = try ok(await client.send(.get, "/v1/audit-log?action=user.create", token: admin), "audit")
            #expect(try await client.send(.delete, "/v1/endpoints/\(endpoint)", token: admin).status == .noContent)
            _ = try ok(await client.send(.delete, "/v1/api-keys/\(keyID)", token: admin), "revoke key")
        }
    }

    /// The JSON body of a 2xx (or 302) response; anything else fails the test with the body.
    func ok(_ response: TestResponse, _ what: String, sourceLocation: SourceLocation = #_sourceLocation) throws -> [String: Any] {
        try #require(
            (200..<400).contains(response.status.code), "\(what): \(response.status.code) \(response.text)", sourceLocation: sourceLocation)
        return response.json
    }

    // MARK: Reading the catalogue and the statistics

    /// Tables of `database` that carry a row-level security policy or an organisation_id
    /// column, but the exempt ones.
    func tenantTables(in database: String) async throws -> [String] {
        var tables: [String] = []
        try await withClient(url(env.ownerURL, database: database)) { client in
            let rows = try await client.query(
                """
                SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p')
                  AND (EXISTS (SELECT 1 FROM pg_policy p WHERE p.polrelid = c.oid)
                       OR EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attname = 'organisation_id' AND NOT a.attisdropped))
                ORDER BY c.relname
                """, logger: env.logger)
            for try await name in rows.decode(String.self) where Self.exemptTables[name] == nil { tables.append(name) }
        }
        return tables
    }

    /// What herald_app and herald_worker sent to `database`, as pg_stat_statements normalised it.
    /// Read through the shared test database, where `scripts/pg.sh recreate-db` made the view;
    /// the owner role reads every role's text (pg_read_all_stats).
    func statements(in database: String) async throws -> [(query: String, role: String)] {
        var found: [(String, String)] = []
        try await withClient(env.ownerURL) { client in
            let rows = try await client.query(
                """
                SELECT s.query, r.rolname FROM pg_stat_statements s JOIN pg_roles r ON r.oid = s.userid
                WHERE s.dbid = (SELECT oid FROM pg_database WHERE datname = \(database))
                  AND r.rolname IN ('herald_app', 'herald_worker')
                """, logger: env.logger)
            for try await (query, role) in rows.decode((String, String).self) { found.append((query, role)) }
        }
        return found
    }

    // MARK: Databases and the binary

    /// `base` with its database replaced.
    func url(_ base: String, database: String) -> String { Self.url(base, database: database) }

    /// `base` naming another database.
    static func url(_ base: String, database: String) -> String {
        var components = URLComponents(string: base)!
        components.path = "/" + database
        return components.string!
    }

    func withClient(_ url: String, _ body: (PostgresClient) async throws -> Void) async throws {
        try await Self.withClient(url, env.logger, body)
    }

    static func withClient(_ url: String, _ logger: Logger, _ body: (PostgresClient) async throws -> Void) async throws {
        let client = PostgresClient(configuration: try .fromURL(url), backgroundLogger: logger)
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { await client.run() }
            defer { group.cancelAll() }
            try await body(client)
        }
    }

    /// Runs the herald binary from the temporary directory, without HERALD_SQL_DIR: what it
    /// needs must come with the build. Returns what it printed.
    func herald(_ arguments: [String], _ environment: [String: String]) async throws -> String {
        try await runHerald(arguments, environment)
    }
}
