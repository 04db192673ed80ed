import Foundation
import HeraldCore
import Logging
import PostgresNIO
import Synchronization
import Testing

@testable import HeraldAPI
@testable import HeraldDelivery
@testable import HeraldStore

/// The notification bus (issue 9, part 2): one LISTEN connection whose messages say what
/// changed, one per statement and (organisation, user, kind), and that tells its subscribers
/// to read the database again when it had to reconnect.
@Suite("The notification bus")
struct BusTests {
    let env: TestEnvironment

    init() async throws {
        env = try await TestEnvironment.shared
    }

    @Test("a feed change is one message naming its organisation and user; a subscriber hears only its organisation")
    func feedChanges() async throws {
        // setup
        let a = try await TestOrganisation.make(), b = try await TestOrganisation.make()
        for org in [a, b] {
            _ = try await TestCatalogue.make(in: org)
            for _ in 0..<5 {
                try await org.notify(
                    EventRequest(typeKey: "ISQ_CRITICAL", audience: Audience(userIDs: [org.memberID]), payload: .object([:])))
            }
        }
        let rows = try await a.notificationIDs(of: a.memberID)
        #expect(rows.count == 5)
        try await withBus(organisation: a.id) { bus, heardByA in
            let heardByAll = Received(bus.subscribe())
            // The first marker says LISTEN is in place: what follows is heard.
            #expect(try await eventually { heardByA.messages.contains(.missedMessages) })
            // act: three rows read in one statement, then all read, in A; all read in B; then a
            // last change in A that tells the check all of A's messages have arrived (one
            // channel, one connection: messages come in commit order)
            try await a.store { tx in _ = try await tx.markRead(Array(rows.prefix(3)), of: a.memberID, now: Date()) }
            try await a.store { tx in try await tx.markAllRead(of: a.memberID, through: TimeOrderedID.upperBound(at: Date())) }
            try await b.store { tx in try await tx.markAllRead(of: b.memberID, through: TimeOrderedID.upperBound(at: Date())) }
            try await a.store { tx in _ = try await tx.archive(rows[4], of: a.memberID, now: Date()) }
            let last = BusMessage.feedChanged(organisationID: a.id, userID: a.memberID, kind: .archived)
            // check
            #expect(try await eventually(timeout: .seconds(20)) { heardByA.messages.contains(last) && heardByAll.messages.contains(last) })
            #expect(
                heardByA.feedChanges == [
                    .feedChanged(organisationID: a.id, userID: a.memberID, kind: .read),
                    .feedChanged(organisationID: a.id, userID: a.memberID, kind: .allRead),
                    last,
                ])
            #expect(heardByA.messages.allSatisfy { $0.organisationID == nil || $0.organisationID == a.id })
            #expect(heardByAll.feedChanges.contains(.feedChanged(organisationID: b.id, userID: b.memberID, kind: .allRead)))
        }
    }

    @Test("after its connection is killed the bus says messages may have been missed, and messages flow again")
    func reconnects() async throws {
        // setup
        let org = try await TestOrganisation.make()
        _ = try await TestCatalogue.make(in: org)
        try await org.notify(EventRequest(typeKey: "ISQ_CRITICAL", audience: Audience(userIDs: [org.memberID]), payload: .object([:])))
        let row = try #require(try await org.notificationIDs(of: org.memberID).first)
        try await withBus(organisation: org.id) { bus, heard in
            // (The notify's rows may be numbered for the live streams after the bus listens: herald_stream.)
            #expect(
                try await eventually { heard.messages.filter(\.isNotStreamNumbering) == [.missedMessages] && bus.listenerProcessID != nil })
            try await org.store { tx in _ = try await tx.setRead(row, of: org.memberID, read: true, now: Date()) }
            let read = BusMessage.feedChanged(organisationID: org.id, userID: org.memberID, kind: .read)
            #expect(try await eventually { heard.messages.contains(read) })
            let killed = try #require(bus.listenerProcessID)
            // act: the owner ends the bus's backend (the bus under test listens as the owner)
            try await env.ownerQuery("SELECT pg_terminate_backend(\(killed))")
            // check: a resync marker once it listens again on a new backend, then messages again
            #expect(try await eventually { heard.messages.filter { $0 == .missedMessages }.count == 2 })
            #expect(bus.listenerProcessID != killed)
            try await org.store { tx in _ = try await tx.setRead(row, of: org.memberID, read: false, now: Date()) }
            let unread = BusMessage.feedChanged(organisationID: org.id, userID: org.memberID, kind: .unread)
            #expect(try await eventually { heard.messages.contains(unread) })
            // (Each change is also numbered for the live streams: herald_stream, 0010.)
            let feedMessages = heard.messages.filter(\.isNotStreamNumbering)
            #expect(feedMessages == [.missedMessages, read, .missedMessages, unread])
            #expect(heard.messages.contains(.streamsAdvanced(organisationID: org.id, userIDs: [org.memberID])))
        }
    }

    @Test("an event's message says what it left: deliveries wake the outbox, an accepted fan-out the fan-out runners, in-app rows neither")
    func eventWork() async throws {
        let org = try await TestOrganisation.make()
        _ = try await TestCatalogue.make(in: org)
        try await withBus(organisation: org.id) { _, heard in
            #expect(try await eventually { heard.messages.contains(.missedMessages) })
            // TASK_ASSIGNED is in-app only; ISQ_CRITICAL also emails; everyone above a limit of 1 is chunked.
            let inApp = try await org.notify(
                EventRequest(
                    typeKey: "TASK_ASSIGNED", audience: Audience(userIDs: [org.memberID]), payload: .object(["title": .string("t")]))
            ).event.id
            let mailed = try await org.notify(
                EventRequest(typeKey: "ISQ_CRITICAL", audience: Audience(userIDs: [org.memberID]), payload: .object([:]))
            ).event.id
            let chunked = try await org.store { tx in
                try await tx.send(
                    EventRequest(typeKey: "TASK_ASSIGNED", audience: Audience(everyone: true), payload: .object(["title": .string("all")])),
                    now: Date(), fanout: FanoutSettings(synchronousLimit: 1, chunkSize: 1)
                ).id
            }
            let expected: [BusMessage] = [
                .eventCommitted(organisationID: org.id, eventID: inApp, work: []),
                .eventCommitted(organisationID: org.id, eventID: mailed, work: .deliveries),
                .eventCommitted(organisationID: org.id, eventID: chunked, work: .fanout),
            ]
            #expect(try await eventually { expected.allSatisfy(heard.messages.contains) })
            let outbox = OutboxQueue(
                database: env.database, organisation: nil, circuit: CircuitRule(failures: 5, cooldown: 60), slots: EndpointSlots(limit: 8))
            let fanouts = FanoutQueue(database: env.database)
            #expect(expected.map(outbox.wakes(on:)) == [false, true, false])
            #expect(expected.map(fanouts.wakes(on:)) == [false, false, true])
            // A message without the flags (a build before them): every runner looks.
            let old = try #require(BusMessage(channel: NotificationBus.eventsChannel, payload: "\(org.id.lowercased):\(inApp.lowercased)"))
            #expect(old == .eventCommitted(organisationID: org.id, eventID: inApp, work: .unknown))
            #expect(outbox.wakes(on: old) && fanouts.wakes(on: old))
            _ = try await org.store { tx in try await tx.cancelEvent(chunked, now: Date()) }
        }
    }

    /// Runs `body` with a bus of its own, listening as the owner, and what a subscriber of
    /// `organisation` hears from before its first connection.
    func withBus(organisation: UUID, _ body: (NotificationBus, Received) async throws -> Void) async throws {
        let client = PostgresClient(configuration: try .fromURL(env.ownerURL), backgroundLogger: env.logger)
        var configuration = NotificationBusConfiguration()
        configuration.minimumBackoff = .milliseconds(50)
        let bus = NotificationBus(client: client, configuration: configuration, logger: env.logger)
        let heard = Received(bus.subscribe(organisation: organisation))
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { await client.run() }
            group.addTask { try await bus.run() }
            try await body(bus, heard)
            group.cancelAll()
        }
    }
}

/// Every message a subscription received so far (until the bus stops and ends the stream).
final class Received: Sendable {
    private let received = Mutex<[BusMessage]>([])

    init(_ stream: AsyncStream<BusMessage>) {
        Task { [self] in for await message in stream { received.withLock { $0.append(message) } } }
    }

    var messages: [BusMessage] { received.withLock { $0 } }

    /// The feed changes only, in order.
    var feedChanges: [BusMessage] {
        messages.filter { if case .feedChanged = $0 { true } else { false } }
    }
}

extension TestOrganisation {
    /// The ids of `user`'s in-app rows, oldest first.
    func notificationIDs(of user: UUID) async throws -> [UUID] {
        try await store { tx in
            try await tx.connection.query("SELECT id FROM notifications WHERE user_id = \(user) ORDER BY id", logger: tx.logger)
                .collect().map { try $0.decode(UUID.self) }
        }
    }
}

extension TestEnvironment {
    /// One statement as the owner role.
    func ownerQuery(_ query: PostgresQuery) async throws {
        let client = PostgresClient(configuration: try .fromURL(ownerURL), backgroundLogger: logger)
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { await client.run() }
            _ = try await client.query(query, logger: logger).collect()
            group.cancelAll()
        }
    }
}

extension BusMessage {
    /// Not one of the stream sweep's `streamsAdvanced`, which comes when the sweep gets to it.
    var isNotStreamNumbering: Bool {
        if case .streamsAdvanced = self { false } else { true }
    }
}
