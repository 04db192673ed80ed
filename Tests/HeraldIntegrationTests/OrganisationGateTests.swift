import Foundation
import HTTPTypes
import HeraldCore
import HummingbirdTesting
import PostgresNIO
import Synchronization
import Testing

@testable import HeraldAPI
@testable import HeraldStore

/// Each organisation's requests in the database at once (issue 12, fairness): while another
/// organisation uses the instance, past its places an organisation's requests wait in line
/// before they take a connection, past its queue they get a 429 problem, and the other
/// organisation's requests, and its own users' bells, go straight through meanwhile. Alone, it
/// is not bounded. The clock is injected.
@Suite("Organisation gate")
struct OrganisationGateTests {
    /// Waits (polling every 10 ms, at most 10 s) for a state other tasks reach, not time.
    func waitFor(_ what: String, _ condition: () -> Bool) async throws {
        try #require(try await eventually(timeout: .seconds(10), every: .milliseconds(10)) { condition() }, "never: \(what)")
    }

    /// The owner's change of the member, held in the database by a transaction of ours that
    /// holds the member's row, until `release` is called.
    struct HeldChange {
        let change: Task<TestResponse, any Error>
        let holder: Task<Void, any Error>
        let release: @Sendable () -> Void

        func finish() async throws -> TestResponse {
            release()
            try await holder.value
            return try await change.value
        }
    }

    func holdChange(_ org: TestOrganisation, _ client: any TestClientProtocol, _ name: String) async throws -> HeldChange {
        let (locked, lockedGo) = AsyncStream.makeStream(of: Void.self)
        let (release, releaseGo) = AsyncStream.makeStream(of: Void.self)
        let holder = Task {
            try await org.store { tx in
                try await tx.query("SELECT 1 FROM users WHERE id = \(org.memberID) FOR UPDATE")
                lockedGo.yield()
                for await _ in release { break }
            }
        }
        for await _ in locked { break }
        let change = Task {
            try await client.send(.patch, "/v1/users/\(org.memberID)", token: org.ownerToken, json: #"{"display_name": "\#(name)"}"#)
        }
        return HeldChange(change: change, holder: holder, release: { releaseGo.yield() })
    }

    @Test(
        "while another organisation uses the instance, a request held in the database keeps its organisation's next one waiting and the one after refused"
    )
    func heldRequest() async throws {
        let (org, other) = (try await TestOrganisation.make(), try await TestOrganisation.make())
        let clock = TestClock()
        let gate = OrganisationGate(limit: 1, queueLimit: 1, window: 1, now: { clock.now() })
        let lane = OrganisationGate.LaneKey(organisationID: org.id, kind: .calls)
        let app = try await TestEnvironment.shared.application(now: { clock.now() }, gate: gate)
        try await app.test(.router) { client in
            // Alone on the instance, the organisation is not bounded: a second request runs
            // beside the held one.
            let first = try await holdChange(org, client, "First")
            try await waitFor("the change runs") { gate.load(lane) == (1, 0) }
            #expect(try await client.send(.get, "/v1/events", token: org.ownerToken).status == .ok)
            #expect(try await first.finish().status == .ok)

            // Another organisation's request makes the instance shared for a second.
            #expect(try await client.send(.get, "/v1/events", token: other.ownerToken).status == .ok)
            let held = try await holdChange(org, client, "Held")
            try await waitFor("the change runs") { gate.load(lane) == (1, 0) }
            let waiting = Task { try await client.send(.get, "/v1/events", token: org.ownerToken) }
            try await waitFor("the next request waits") { gate.load(lane) == (1, 1) }

            let refused = try await client.send(.get, "/v1/users", token: org.ownerToken)
            #expect(refused.isProblem(.tooManyRequests), "\(refused.text)")
            #expect(refused.headers[.retryAfter] == "1")
            #expect((refused.json["detail"] as? String)?.contains("(1 running, 1 waiting)") == true, "\(refused.text)")

            // A forged API key naming the organisation waits in a lane of its own (in this
            // one, whose queue is full, it would get a 429): it is checked, and refused as such.
            let forged = "hk.\(org.id.lowercased).\(UUID().lowercased).not-a-secret"
            #expect(try await client.send(.get, "/v1/events", token: forged).isProblem(.unauthorized))
            // Another organisation, and the organisation's own users' feed, are not in that line.
            #expect(try await client.send(.get, "/v1/events", token: other.ownerToken).status == .ok)
            #expect(try await client.send(.get, "/v1/me/notifications", token: org.memberToken).status == .ok)
            #expect(gate.load(lane) == (1, 1), "the waiting request has not run")

            let changed = try await held.finish()
            #expect(changed.status == .ok, "\(changed.text)")
            #expect(changed.json["display_name"] as? String == "Held")
            #expect(try await waiting.value.status == .ok)
            #expect(gate.load(lane) == (0, 0))

            // A second after the other organisation's last request, the organisation is alone again.
            clock.advance(1.5)
            let alone = try await holdChange(org, client, "Alone")
            try await waitFor("the change runs") { gate.load(lane) == (1, 0) }
            #expect(try await client.send(.get, "/v1/events", token: org.ownerToken).status == .ok)
            #expect(try await alone.finish().status == .ok)
        }
    }

    @Test("the gate admits in order, and a cancelled waiter leaves no place taken")
    func orderAndCancellation() async throws {
        let fixed = Date()
        let gate = OrganisationGate(limit: 1, queueLimit: 3, window: 1, now: { fixed })
        let lane = OrganisationGate.LaneKey(organisationID: UUID(), kind: .calls)
        // Another organisation came first: the instance is shared (the clock stands still).
        try await gate.run(.init(organisationID: UUID(), kind: .calls)) {}
        let (release, releaseGo) = AsyncStream.makeStream(of: Void.self)
        let first = Task { try await gate.run(lane) { for await _ in release { break } } }
        try await waitFor("the first runs") { gate.load(lane) == (1, 0) }

        let order = Order()
        var waiters: [Task<Void, any Error>] = []
        for index in 0..<3 {
            waiters.append(Task { try await gate.run(lane) { order.append(index) } })
            try await waitFor("waiter \(index) waits") { gate.load(lane) == (1, index + 1) }
        }
        waiters[1].cancel()
        await #expect(throws: CancellationError.self) { try await waiters[1].value }
        #expect(gate.load(lane) == (1, 2))

        releaseGo.yield()
        try await first.value
        try await waiters[0].value
        try await waiters[2].value
        #expect(order.values == [0, 2])
        #expect(gate.load(lane) == (0, 0))
    }

    @Test(
        "once an organisation is alone again, its waiting requests are let in; forged keys do not make it shared",
        .timeLimit(.minutes(1)))
    func sharingEnds() async throws {
        let clock = TestClock()
        let gate = OrganisationGate(limit: 1, queueLimit: 3, window: 1, now: { clock.now() })
        let lane = OrganisationGate.LaneKey(organisationID: UUID(), kind: .calls)
        // A key not yet proven, naming another organisation, does not make the instance shared...
        try await gate.run(.init(organisationID: UUID(), kind: .unproven)) {}
        let (release, releaseGo) = AsyncStream.makeStream(of: Void.self)
        let first = Task { try await gate.run(lane) { for await _ in release { break } } }
        try await waitFor("the first runs") { gate.load(lane) == (1, 0) }
        try await gate.run(lane) { #expect(gate.load(lane) == (2, 0), "alone: a second runs beside the first") }
        // ...another organisation's proven request does.
        try await gate.run(.init(organisationID: UUID(), kind: .calls)) {}
        let waiter = Task { try await gate.run(lane) {} }
        try await waitFor("the next waits") { gate.load(lane) == (1, 1) }
        // A second later the organisation is alone: the next request lets the waiter in first,
        // then runs too, while the first still holds its place.
        clock.advance(1.5)
        try await gate.run(lane) {}
        try await waiter.value
        #expect(gate.load(lane) == (1, 0))
        releaseGo.yield()
        try await first.value
        #expect(gate.load(lane) == (0, 0))
    }

    @Test("two requests with one API key never wait on each other to mark it used")
    func markingKeysUsedNeverWaits() async throws {
        let org = try await TestOrganisation.make()
        let key = OpaqueToken(kind: .apiKey, organisationID: org.id)
        try await org.store { tx in
            _ = try await tx.createApiKey(
                id: key.id, name: "k", roleID: try await tx.builtinRole(.service).id, secretHash: key.secretHash, expiresAt: nil)
        }
        let start = Date()
        let (marked, markedGo) = AsyncStream.makeStream(of: Void.self)
        let (done, doneGo) = AsyncStream.makeStream(of: Void.self)
        // The first request marks the key used and holds its row until the second has finished.
        let first = Task {
            try await org.store { tx in
                let grant = try await tx.grant(forApiKey: key.id, secretHash: key.secretHash, now: start)
                #expect(grant != nil)
                markedGo.yield()
                for await _ in done { break }
            }
        }
        for await _ in marked { break }
        // Two minutes later by its clock the second would mark it too, but the row is held: it
        // goes on without (waiting would block until the database deadline, and fail).
        let second = try await org.store { tx in
            try await tx.grant(forApiKey: key.id, secretHash: key.secretHash, now: start.addingTimeInterval(120))
        }
        #expect(second != nil)
        doneGo.yield()
        try await first.value
        let used = try await org.store { tx in
            try await tx.query("SELECT last_used_at FROM api_keys WHERE id = \(key.id)").first!.decode(Date.self)
        }
        #expect(abs(used.timeIntervalSince(start)) < 1, "the first request's mark stands")
    }

    @Test("the bound and the queue come from the environment, in range")
    func configuration() throws {
        let base = ["DATABASE_URL": "postgres://u@127.0.0.1/db"]
        let defaults = try AppConfiguration.fromEnvironment(base)
        let cores = ProcessInfo.processInfo.activeProcessorCount
        #expect(defaults.organisationConcurrency >= 1 && defaults.organisationConcurrency <= max(1, cores / 2))
        if cores <= 3 { #expect(defaults.organisationConcurrency == 1, "half of \(cores) cores, at least one") }
        #expect(defaults.organisationQueue == 256)
        let set = try AppConfiguration.fromEnvironment(
            base.merging(["HERALD_ORGANISATION_CONCURRENCY": "0", "HERALD_ORGANISATION_QUEUE": "10"]) { $1 })
        #expect(set.organisationConcurrency == 0 && set.organisationQueue == 10)
        for (name, value) in [("HERALD_ORGANISATION_CONCURRENCY", "-1"), ("HERALD_ORGANISATION_QUEUE", "lots")] {
            #expect(throws: ConfigurationError.self) { try AppConfiguration.fromEnvironment(base.merging([name: value]) { $1 }) }
        }
    }

    final class Order: Sendable {
        let list = Mutex<[Int]>([])
        func append(_ value: Int) { list.withLock { $0.append(value) } }
        var values: [Int] { list.withLock { $0 } }
    }
}
