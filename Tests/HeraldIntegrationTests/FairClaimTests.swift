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
        try await TestEnvironment.shared.withScratchDatabase("fair") { app, worker, _ in try await check(app: app, worker: worker) }
    }

    func check(app: Database, worker: Database) async throws {
        // setup: organisation A with 40 due emails, then B with 2 (newer), then C with 1 whose
        // lease expired while it was being sent
        let a = try await app.emailOutbox("fair-a", users: 1, events: 40)
        let b = try await app.emailOutbox("fair-b", users: 1, events: 2)
        let c = try await app.emailOutbox("fair-c", users: 1, events: 1)
        let stalled = try await worker.claimDeliveries(worker: "crashed", limit: 1, leaseSeconds: 60, organisation: c)
        #expect(stalled.count == 1)
        _ = try await worker.withTenant(c) { tx in
            try await tx.query("UPDATE deliveries SET lease_expires_at = now() - interval '1 second' WHERE organisation_id = \(c)")
        }

        // act: one unconfined claim of 10
        let queue = OutboxQueue(
            database: worker, organisation: nil, circuit: CircuitRule(failures: 5, cooldown: 60), slots: EndpointSlots(limit: 8))
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
}
