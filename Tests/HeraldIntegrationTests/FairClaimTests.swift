import Foundation
import HeraldCore
import Logging
import PostgresNIO
import Testing

@testable import HeraldAPI
@testable import HeraldDelivery
@testable import HeraldStore

/// Fair claiming (issue 12, migration 0023): an unconfined worker claims from every organisation
/// with due work in turn, so one organisation's backlog does not hold the slots another's single
/// delivery needs. In a database of its own: an unconfined claim takes any organisation's
/// deliveries, and the shared test database's other suites have theirs.
@Suite("Fair claiming between organisations")
struct FairClaimTests {
    @Test("shares fill from the organisation with the least due work up")
    func shares() {
        let (a, b, c) = (UUID(), UUID(), UUID())
        func split(_ limit: Int, _ due: [(UUID, Int)]) -> [UUID: Int] {
            Dictionary(uniqueKeysWithValues: OutboxQueue.shares(of: limit, among: due.map { (organisation: $0.0, due: $0.1) }))
        }
        #expect(split(10, [(a, 1000), (b, 2)]) == [a: 8, b: 2])
        #expect(split(9, [(a, 1000), (b, 1000), (c, 1000)]) == [a: 3, b: 3, c: 3])
        #expect(split(10, [(a, 1000), (b, 1000), (c, 1)]) == [a: 5, b: 4, c: 1])
        #expect(split(2, [(a, 5), (b, 5), (c, 5)]) == [a: 1, b: 1], "the longest waiting first when slots run out")
        #expect(split(32, [(a, 3)]) == [a: 3])
        #expect(split(5, []).isEmpty)
    }

    @Test("a backlog of one organisation leaves slots for another's newer deliveries; expired leases are rescued everywhere")
    func claimsTakeTurns() async throws {
        let env = try await TestEnvironment.shared
        let name = "fair_\(UUID().uuidString.prefix(8).lowercased())"
        try await CitusReadinessTests.withClient(env.ownerURL, env.logger) {
            _ = try await $0.query("CREATE DATABASE \(unescaped: name)", logger: env.logger)
        }
        do {
            _ = try runHerald(["migrate"], ["DATABASE_OWNER_URL": CitusReadinessTests.url(env.ownerURL, database: name)])
            try await CitusReadinessTests.withClient(CitusReadinessTests.url(env.appURL, database: name), env.logger) { app in
                try await CitusReadinessTests.withClient(CitusReadinessTests.url(env.workerURL, database: name), env.logger) { worker in
                    try await check(app: Database(client: app, logger: env.logger), worker: Database(client: worker, logger: env.logger))
                }
            }
        } catch {
            try? await CitusReadinessTests.withClient(env.ownerURL, env.logger) {
                _ = try await $0.query("DROP DATABASE \(unescaped: name) WITH (FORCE)", logger: env.logger)
            }
            throw error
        }
        try? await CitusReadinessTests.withClient(env.ownerURL, env.logger) {
            _ = try await $0.query("DROP DATABASE \(unescaped: name) WITH (FORCE)", logger: env.logger)
        }
    }

    func check(app: Database, worker: Database) async throws {
        // setup: organisation A with 40 due emails, then B with 2 (newer), then C with 1 whose
        // lease expired while it was being sent
        let a = try await organisation("a", app, emails: 40)
        let b = try await organisation("b", app, emails: 2)
        let c = try await organisation("c", app, emails: 1)
        let stalled = try await worker.claimDeliveries(worker: "crashed", limit: 1, leaseSeconds: 60, organisation: c)
        #expect(stalled.count == 1)
        try await worker.withTenant(c) { tx in
            try await tx.query("UPDATE deliveries SET lease_expires_at = now() - interval '1 second' WHERE organisation_id = \(c)")
        }

        // act: one unconfined claim of 10
        let queue = OutboxQueue(database: worker, organisation: nil, circuit: CircuitRule(failures: 5, cooldown: 60))
        let claimed = try await queue.claim(worker: "fair", limit: 10, leaseSeconds: 60)

        // check: B's two are in, A takes the rest; a FIFO claim would have taken A's ten oldest
        let byOrganisation = Dictionary(grouping: claimed, by: \.organisationID).mapValues(\.count)
        #expect(byOrganisation == [a: 8, b: 2], "\(byOrganisation)")
        // C has nothing due (its row is SENDING): the heartbeat's rescue puts it back, logged EXPIRED.
        #expect(try await queue.rescueExpired(worker: "fair") == 1)
        let (status, logged) = try await app.withTenant(c) { tx in
            let row = try await tx.query(
                """
                SELECT d.status, (SELECT count(*)::int FROM delivery_attempts a WHERE a.organisation_id = d.organisation_id
                                  AND a.delivery_id = d.id AND a.outcome = 'EXPIRED')
                FROM deliveries d WHERE d.organisation_id = \(c)
                """
            ).first!
            return try row.decode((String, Int).self)
        }
        #expect(status == "FAILED" && logged == 1)
        #expect(try await queue.claim(worker: "fair", limit: 10, leaseSeconds: 60).map(\.organisationID).contains(c))
    }

    /// An organisation whose one user has `emails` email deliveries due.
    func organisation(_ slug: String, _ database: Database, emails: Int) async throws -> UUID {
        let id = try await database.createOrganisation(slug: "fair-\(slug)", name: "Fair \(slug)").id
        try await database.withTenant(id) { tx in
            let category = try await tx.createCategory(key: "news", name: "News", description: "", critical: false)
            _ = try await tx.createNotificationType(
                NotificationTypeFields(
                    key: "NEWS", categoryID: category.id, name: "News", description: "", defaultSeverity: .info, defaultPriority: .normal,
                    defaultChannels: [.email]))
            let user = try await tx.createUser(NewUser(email: "reader@\(slug).example", displayName: "Reader"))
            for _ in 0..<emails {
                let planned = try await tx.planEvent(
                    EventRequest(typeKey: "NEWS", audience: Audience(userIDs: [user.id]), payload: .object([:])), eventID: UUID(),
                    now: Date())
                try await tx.write(planned.event, type: planned.type, plan: planned.plan)
            }
        }
        return id
    }
}
