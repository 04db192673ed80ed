import Foundation
import HeraldCore
import HeraldStore
import Hummingbird
import HummingbirdTesting
import Logging
import PostgresNIO
import Testing

@testable import HeraldAPI

/// The request boundary (issue 9, part 1): one tenant transaction per request, counted by the
/// server itself, and store errors mapped in one place.
@Suite("Request boundary")
struct RequestBoundaryTests {
    let env: TestEnvironment

    init() async throws {
        env = try await TestEnvironment.shared
    }

    /// Counts what PostgreSQL ran in a database of this test's own (other suites run in
    /// parallel in the shared one): `pg_stat_statements` is loaded by `scripts/pg.sh`.
    struct StatementCounter {
        let env: TestEnvironment
        let database: String

        /// Calls of statements the application role sent whose text starts with `prefix`, in
        /// this database (every statement with the empty prefix).
        func calls(_ prefix: String) async throws -> Int {
            let client = PostgresClient(configuration: try .fromURL(env.ownerURL), backgroundLogger: env.logger)
            return try await withThrowingTaskGroup(of: Int.self) { group in
                group.addTask {
                    await client.run(); return 0
                }
                defer { group.cancelAll() }
                let rows = try await client.query(
                    """
                    SELECT coalesce(sum(s.calls), 0)::bigint FROM pg_stat_statements s
                    JOIN pg_database d ON d.oid = s.dbid
                    WHERE d.datname = \(database) AND s.query LIKE \(prefix + "%")
                      AND s.userid = (SELECT oid FROM pg_roles WHERE rolname = 'herald_app')
                    """, logger: env.logger)
                var total = 0
                for try await n in rows.decode(Int.self) { total = n }
                return total
            }
        }
    }

    @Test("an authenticated request runs one tenant transaction, entered with its grant in one statement")
    func oneTransactionPerRequest() async throws {
        let name = "boundary_\(UUID().uuidString.prefix(8).lowercased())"
        try await owner { try await $0.query("CREATE DATABASE \(unescaped: name)", logger: env.logger) }
        defer { Task { try? await owner { _ = try await $0.query("DROP DATABASE \(unescaped: name) WITH (FORCE)", logger: env.logger) } } }
        var ownerURL = URLComponents(string: env.ownerURL)!
        ownerURL.path = "/" + name
        var appURL = URLComponents(string: env.appURL)!
        appURL.path = "/" + name
        let migrations = try Migration.shipped()
        try await client(ownerURL.string!) { client in
            _ = try await Migrator(client: client, logger: env.logger).migrate(migrations)
        }
        let counter = StatementCounter(env: env, database: name)
        try await client(appURL.string!) { postgres in
            let database = Database(client: postgres, logger: env.logger)
            let organisation = try await database.createOrganisation(slug: "boundary-\(name.suffix(8))", name: "Boundary")
            let (ownerID, memberID) = try await database.withTenant(organisation.id) { tx in
                let owner = try await tx.createUser(NewUser(email: "owner@boundary.example", displayName: "Owner", passwordHash: nil))
                _ = try await tx.setUserRoles(owner.id, [try await tx.builtinRole(.owner).id])
                let member = try await tx.createUser(NewUser(email: "member@boundary.example", displayName: "Member", passwordHash: nil))
                _ = try await tx.setUserRoles(member.id, [try await tx.builtinRole(.member).id])
                return (owner.id, member.id)
            }
            let ownerToken = try await env.tokens.issueAccessToken(organisationID: organisation.id, userID: ownerID, now: Date())
            let memberToken = try await env.tokens.issueAccessToken(organisationID: organisation.id, userID: memberID, now: Date())
            // One instant for the whole test: the rate limiter keeps an organisation's limits for
            // 30 s by this clock, and a test slowed past that on a loaded machine had a request
            // re-read them (a fifth statement) or a bell read go the general way.
            let start = Date()
            let app = try env.application(now: { start }, database: database)
            try await app.test(.router) { http in
                let serviceRole = try await database.withTenant(organisation.id) { tx in try await tx.builtinRole(.service).id }
                let key = try await http.send(
                    .post, "/v1/api-keys", token: ownerToken, json: #"{"name": "CRM", "role_id": "\#(serviceRole)"}"#)
                #expect(key.status == .created)
                let apiKey = try #require(key.json["secret"] as? String)

                // The entry: one statement sets the context and reads the caller's grant.
                let entries = [
                    "SELECT active, permissions, last_engaged_at, warned FROM enter_tenant_as_user",
                    "SELECT secret_hash, expires_at, revoked_at, permissions, last_used_at FROM enter_tenant_with_api_key",
                ]
                func entered() async throws -> Int { try await counter.calls(entries[0]) + counter.calls(entries[1]) }
                let (begins, commits, contexts, grants) = (
                    try await counter.calls("BEGIN"), try await counter.calls("COMMIT"), try await entered(),
                    try await counter.calls("SELECT active, permissions, last_engaged_at, warned FROM user_grant")
                )
                // Reads, a write, the feed (confined to the caller), an API key, a refusal.
                let requests: [(HTTPRequest.Method, String, String, String?, HTTPResponse.Status)] = [
                    (.get, "/v1/users", ownerToken, nil, .ok),
                    (.post, "/v1/groups", ownerToken, #"{"key": "g1", "name": "G1"}"#, .created),
                    (.get, "/v1/me/notifications/unread-count", memberToken, nil, .ok),
                    (.get, "/v1/me/notifications", memberToken, nil, .ok),
                    (.get, "/v1/events", apiKey, nil, .ok),
                    (.get, "/v1/users", memberToken, nil, .forbidden),
                    (.get, "/v1/groups/\(UUID())", ownerToken, nil, .notFound),
                ]
                for (method, path, token, body, status) in requests {
                    let response = try await http.send(method, path, token: token, json: body)
                    #expect(response.status == status, "\(method) \(path): \(response.text)")
                }
                // The bell's two reads are one statement each (migration 0031), no transaction.
                let bellReads = 2
                #expect(try await counter.calls("BEGIN") - begins == requests.count - bellReads)
                #expect(try await entered() - contexts == requests.count - bellReads)
                // No request read its grant again, nor set the context by a statement of its own.
                #expect(try await counter.calls("SELECT active, permissions, last_engaged_at, warned FROM user_grant") == grants)
                #expect(try await counter.calls("SET LOCAL") == 0)
                // Each successful one committed once, and so did the 403, refused before the
                // operation ran (it keeps the caller's mark of use); the handler's 404 rolled back.
                #expect(try await counter.calls("COMMIT") - commits == requests.count - bellReads - 1)
                // The key was marked used by its first request; its next, within the minute, sends
                // no mark (the entry reads when it was marked, migration 0042).
                let marks = try await counter.calls("UPDATE api_keys SET last_used_at")
                #expect(marks == 1)
                #expect(try await http.send(.get, "/v1/events", token: apiKey).status == .ok)
                #expect(try await counter.calls("UPDATE api_keys SET last_used_at") == marks)
                // A bell's two reads are one round trip each: the function enters the tenant, checks
                // the grant and reads (the feed read records engagement, through the general path,
                // only when the last is over an hour old). Any other feed read is four: BEGIN, the
                // entry, the read, COMMIT.
                for path in ["/v1/me/notifications/unread-count", "/v1/me/notifications", "/v1/me/notifications?limit=20"] {
                    let (statements, bells) = (try await counter.calls(""), try await counter.calls("SELECT * FROM bell_"))
                    #expect(try await http.send(.get, path, token: memberToken).status == .ok)
                    #expect(try await counter.calls("") - statements == 1, "\(path)")
                    #expect(try await counter.calls("SELECT * FROM bell_") - bells == 1, "\(path)")
                }
                let statements = try await counter.calls("")
                #expect(try await http.send(.get, "/v1/me/notifications?read=false", token: memberToken).status == .ok)
                #expect(try await counter.calls("") - statements == 4)
                // Public operations open none.
                let before = try await counter.calls("BEGIN")
                #expect(try await http.send(.get, "/healthz").status == .ok)
                #expect(try await counter.calls("BEGIN") == before)
            }
        }
    }

    @Test("a lent transaction is unusable once the boundary's closure returns")
    func loanEndsWithItsClosure() async throws {
        let org = try await TestOrganisation.make()
        let loan = try await env.database.withTenant(org.id) { tx in try await tx.lend { $0 } }
        await #expect(throws: TransactionLoanError.closed) {
            try await loan.run { tx in try await tx.organisation() }
        }
    }

    @Test("store errors say what was missing: a role of role_ids is a 422 on that field, a missing user a 404")
    func storeErrorsNameWhatWasMissing() async throws {
        try await withOrganisation { org, http in
            let missingRole = try await http.send(
                .put, "/v1/users/\(org.memberID)/roles", token: org.ownerToken,
                json: #"{"role_ids": ["\#(UUID())"]}"#)
            #expect(missingRole.isProblem(.unprocessableContent))
            #expect((missingRole.json["detail"] as? String)?.hasPrefix("role_ids: names a role") == true, "\(missingRole.text)")
            let missingUser = try await http.send(.put, "/v1/users/\(UUID())/roles", token: org.ownerToken, json: #"{"role_ids": []}"#)
            #expect(missingUser.isProblem(.notFound))
            #expect((missingUser.json["detail"] as? String)?.contains("No user") == true, "\(missingUser.text)")
            let missingKeyRole = try await http.send(
                .post, "/v1/api-keys", token: org.ownerToken, json: #"{"name": "K", "role_id": "\#(UUID())"}"#)
            #expect(missingKeyRole.isProblem(.unprocessableContent))
            #expect((missingKeyRole.json["detail"] as? String)?.hasPrefix("role_id: names a role") == true, "\(missingKeyRole.text)")
        }
    }

    private func owner(_ body: @Sendable (PostgresClient) async throws -> Void) async throws {
        try await client(env.ownerURL, body)
    }

    private func client(_ url: String, _ body: @Sendable (PostgresClient) async throws -> Void) async throws {
        // No keep-alive (`fromURL`'s default): a `SELECT 1` landing between two readings would be
        // counted as a request's statement.
        let configuration = try PostgresClient.Configuration.fromURL(url)
        let client = PostgresClient(configuration: configuration, backgroundLogger: env.logger)
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { await client.run() }
            defer { group.cancelAll() }
            try await body(client)
        }
    }
}
