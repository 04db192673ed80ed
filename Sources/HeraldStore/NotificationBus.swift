import Foundation
import Logging
import Metrics
import PostgresNIO
import ServiceLifecycle
import Synchronization

/// What changed in one user's feed, as the feed tables announce it (migration 0008).
public enum FeedChange: String, Sendable, Codable, CaseIterable {
    case read
    case unread
    case archived
    /// Rows removed: one, a cleared feed, an expiry purge, a cancelled event's future rows.
    case deleted
    /// The user's "all read" watermark moved (mark all read).
    case allRead = "all_read"
}

/// What a committed event left for the work runners, as its `herald_events` message says.
public struct EventWork: OptionSet, Sendable, Hashable {
    public let rawValue: UInt8
    public init(rawValue: UInt8) { self.rawValue = rawValue }

    /// It wrote deliveries (the outbox has work).
    public static let deliveries = EventWork(rawValue: 1)
    /// It was accepted for a chunked fan-out (its recipients are still to be written).
    public static let fanout = EventWork(rawValue: 2)
    /// A message that does not say (from a build before the flags): every runner looks.
    public static let unknown: EventWork = [.deliveries, .fanout]

    /// The payload's suffix: `d` and `f`.
    var flags: String { (contains(.deliveries) ? "d" : "") + (contains(.fanout) ? "f" : "") }

    init(flags: Substring) {
        self = []
        if flags.contains("d") { insert(.deliveries) }
        if flags.contains("f") { insert(.fanout) }
    }
}

/// One message of the bus: what committed, in which organisation.
public enum BusMessage: Sendable, Equatable {
    /// Notify, or a chunk of a fan-out, committed an event's rows (its in-app rows and its
    /// deliveries), or notify accepted an event for a chunked fan-out; `work` says which runners it
    /// concerns, so that an in-app notify wakes no outbox and only an accepted fan-out wakes the
    /// fan-out runners.
    case eventCommitted(organisationID: UUID, eventID: UUID, work: EventWork)
    /// A statement changed the feed of `userID`.
    case feedChanged(organisationID: UUID, userID: UUID, kind: FeedChange)
    /// New numbered changes were logged for these users' feeds (migration 0010): live streams
    /// read them. One message covers up to 150 users.
    case streamsAdvanced(organisationID: UUID, userIDs: [UUID])
    /// The user was deactivated: their streams end.
    case userDeactivated(organisationID: UUID, userID: UUID)
    /// The session (refresh-token family) was revoked: streams opened under it end.
    case sessionRevoked(organisationID: UUID, sessionID: UUID)
    /// Messages may have been lost (the bus reconnected, or this subscriber fell behind):
    /// whatever the subscriber keeps must be read again from the database.
    case missedMessages

    /// The organisation the message is about; nil for `missedMessages`, which concerns all.
    public var organisationID: UUID? {
        switch self {
        case .eventCommitted(let organisation, _, _), .feedChanged(let organisation, _, _),
            .streamsAdvanced(let organisation, _), .userDeactivated(let organisation, _), .sessionRevoked(let organisation, _):
            organisation
        case .missedMessages: nil
        }
    }
}

/// How the bus listens and buffers.
public struct NotificationBusConfiguration: Sendable {
    /// Messages one subscriber may have waiting; past it the oldest are dropped and the
    /// subscriber is told `missedMessages`.
    public var bufferSize = 256
    /// How often the bus reads `pg_notification_queue_usage()` into a gauge, on its own
    /// connection: the same read tells it the connection still answers.
    public var probeInterval: Duration = .seconds(10)
    /// The most that read may take before the connection is deemed lost.
    public var probeDeadline: Duration = .seconds(5)
    /// Reconnection backoff: doubles from `minimumBackoff` up to `maximumBackoff`, with jitter.
    public var minimumBackoff: Duration = .milliseconds(250)
    public var maximumBackoff: Duration = .seconds(30)

    public init() {}
}

/// The process's one `LISTEN` connection, shared (issue 9): it turns PostgreSQL notifications
/// into `BusMessage`s and fans them out to in-process subscribers (the work runners today; live
/// feed streams and cache invalidation next).
///
/// Channels: `herald_events` (`'<organisation id>:<event id>:<flags>'`, sent by notify and each
/// fan-out chunk; `EventWork`) and
/// `herald_feed` (JSON `{"org", "user", "kind"}`, sent by the feed tables' statement triggers) and
/// `herald_stream` (migration 0010: numbered feed changes, deactivations, revoked sessions).
/// The bus carries every organisation; a subscriber names the one it wants.
///
/// A notification sent while no connection listens is lost, so after every (re)connection the
/// bus tells each subscriber `missedMessages` once `LISTEN` is in place, and subscribers read
/// the database again. It reconnects with exponential backoff.
public final class NotificationBus: Service, Sendable {
    static let eventsChannel = "herald_events"
    static let feedChannel = "herald_feed"
    static let streamChannel = "herald_stream"

    let client: PostgresClient
    let configuration: NotificationBusConfiguration
    let logger: Logger
    private let subscribers = Mutex<[UInt64: Subscriber]>([:])
    private let nextSubscriber = Atomic<UInt64>(0)
    /// The backend process id of the listening connection while it is up.
    private let listener = Mutex<Int32?>(nil)
    private let generation = Atomic<UInt64>(0)

    private struct Subscriber: Sendable {
        var organisation: UUID?
        var continuation: AsyncStream<BusMessage>.Continuation
    }

    /// `client` lends the bus one connection for as long as it runs (size its pool for it).
    public init(client: PostgresClient, configuration: NotificationBusConfiguration = NotificationBusConfiguration(), logger: Logger) {
        self.client = client
        self.configuration = configuration
        var logger = logger
        logger[metadataKey: "component"] = "notification-bus"
        self.logger = logger
    }

    /// The messages of `organisation` (nil: of every organisation) from now on, with
    /// `missedMessages` markers. The buffer is bounded: a subscriber that falls behind loses
    /// the oldest messages and is told so. Ending the iteration unsubscribes.
    public func subscribe(organisation: UUID? = nil) -> AsyncStream<BusMessage> {
        let id = nextSubscriber.add(1, ordering: .relaxed).newValue
        let (stream, continuation) = AsyncStream.makeStream(
            of: BusMessage.self, bufferingPolicy: .bufferingNewest(configuration.bufferSize))
        continuation.onTermination = { [weak self] _ in
            _ = self?.subscribers.withLock { $0.removeValue(forKey: id) }
        }
        subscribers.withLock { $0[id] = Subscriber(organisation: organisation, continuation: continuation) }
        return stream
    }

    /// The PostgreSQL backend process id of the listening connection, nil while disconnected
    /// (operators and tests find the connection by it).
    public var listenerProcessID: Int32? { listener.withLock { $0 } }

    /// How many times `LISTEN` has been put in place: each time, messages may have been lost
    /// before it, and `missedMessages` follows. A subscriber that keeps what the messages
    /// invalidate trusts it only once it has handled the `missedMessages` of this generation.
    public var connectionGeneration: UInt64 { generation.load(ordering: .acquiring) }

    public func run() async throws {
        await cancelWhenGracefulShutdown {
            await self.listenUntilCancelled()
        }
        // Finished outside the lock: finishing runs `onTermination`, which takes it.
        let ending = subscribers.withLock { subscribers in
            defer { subscribers.removeAll() }
            return subscribers.values.map(\.continuation)
        }
        for continuation in ending { continuation.finish() }
    }

    private func listenUntilCancelled() async {
        var failures = 0
        while !Task.isCancelled {
            do {
                try await listenOnce()
            } catch {
                // A connection that got as far as listening starts the backoff afresh.
                let wasListening = listener.withLock { pid in
                    defer { pid = nil }
                    return pid != nil
                }
                if wasListening { failures = 0 }
                if Task.isCancelled { return }
                failures += 1
                let delay = backoff(after: failures)
                Counter(label: "herald_notification_bus_reconnects_total").increment()
                logger.warning(
                    "notification bus lost its connection; reconnecting",
                    metadata: [
                        "error": "\(String(reflecting: error))", "retry_in": "\(delay)", "failures": "\(failures)",
                    ])
                try? await Task.sleep(for: delay)
            }
        }
    }

    /// One connection's life: LISTEN on both channels, announce `missedMessages`, forward until
    /// the connection fails (a notification stream ends or throws, or the probe fails). The
    /// probe runs from the start, so even a LISTEN that never answers ends at its deadline (the
    /// probe's overrun closes the connection, which fails the LISTEN).
    private func listenOnce() async throws {
        try await client.withConnection { connection in
            try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask { try await self.probe(connection) }
                group.addTask { try await self.listen(on: connection) }
                // The first to end means the connection is gone: end the other.
                _ = try await group.next()
                group.cancelAll()
                throw BusConnectionLost()
            }
        }
    }

    private func listen(on connection: PostgresConnection) async throws {
        let pid = try await Database.statement(
            "SELECT pg_backend_pid()", on: connection, logger: logger,
            until: .now + configuration.probeDeadline
        ).first?.decode(Int32.self)
        try await connection.listen(on: Self.eventsChannel) { events in
            try await connection.listen(on: Self.feedChannel) { feed in
                try await connection.listen(on: Self.streamChannel) { stream in
                    generation.add(1, ordering: .releasing)
                    listener.withLock { $0 = pid ?? 0 }
                    logger.info("notification bus listening", metadata: ["backend_pid": "\(pid.map(String.init) ?? "-")"])
                    // Anything committed while nobody listened is lost: subscribers read again.
                    publish(.missedMessages)
                    try await withThrowingTaskGroup(of: Void.self) { group in
                        group.addTask { try await self.forward(events, of: Self.eventsChannel) }
                        group.addTask { try await self.forward(feed, of: Self.feedChannel) }
                        group.addTask { try await self.forward(stream, of: Self.streamChannel) }
                        _ = try await group.next()
                        group.cancelAll()
                    }
                }
            }
        }
    }

    private func forward(_ notifications: PostgresNotificationSequence, of channel: String) async throws {
        for try await notification in notifications {
            if let message = BusMessage(channel: channel, payload: notification.payload) {
                publish(message)
            } else {
                logger.debug(
                    "notification not understood", metadata: ["channel": .string(channel), "payload": .string(notification.payload)])
            }
        }
    }

    /// Reads the notification queue's fill (a gauge; at 1.0 every NOTIFY fails) on the listening
    /// connection every `probeInterval`; a read that fails or overruns its deadline means the
    /// connection is lost (a half-open TCP connection would otherwise go unnoticed for ever).
    private func probe(_ connection: PostgresConnection) async throws {
        let usage = Gauge(label: "herald_notification_queue_usage")
        while true {
            let rows = try await Database.statement(
                "SELECT pg_notification_queue_usage()", on: connection, logger: logger,
                until: .now + configuration.probeDeadline)
            if let fill = try rows.first?.decode(Double.self) { usage.record(fill) }
            try await Task.sleep(for: configuration.probeInterval)
        }
    }

    /// Hands `message` to every subscriber that wants it. A subscriber whose buffer is full
    /// loses its oldest message and gets `missedMessages` in its place.
    func publish(_ message: BusMessage) {
        let targets = subscribers.withLock { subscribers in
            subscribers.values.filter { subscriber in
                guard let wanted = subscriber.organisation, let organisation = message.organisationID else { return true }
                return wanted == organisation
            }.map(\.continuation)
        }
        for continuation in targets {
            if case .dropped = continuation.yield(message), message != .missedMessages {
                Counter(label: "herald_notification_bus_overflows_total").increment()
                continuation.yield(.missedMessages)
            }
        }
    }

    private func backoff(after failures: Int) -> Duration {
        let doubled = configuration.minimumBackoff * (1 << min(failures - 1, 16))
        let capped = min(doubled, configuration.maximumBackoff)
        return capped * Double.random(in: 0.5...1.0)
    }
}

/// The listening connection ended without an error of its own.
struct BusConnectionLost: Error, CustomStringConvertible {
    var description: String { "the listening connection ended" }
}

extension BusMessage {
    /// Parses a notification of `herald_events` or `herald_feed`; nil for anything else.
    init?(channel: String, payload: String) {
        switch channel {
        case NotificationBus.eventsChannel:
            // `<organisation>:<event>:<flags>`; without the flags (a build before them), every runner looks.
            let parts = payload.split(separator: ":", omittingEmptySubsequences: false)
            guard parts.count == 2 || parts.count == 3, let organisation = UUID(uuidString: String(parts[0])),
                let event = UUID(uuidString: String(parts[1]))
            else {
                return nil
            }
            self = .eventCommitted(
                organisationID: organisation, eventID: event, work: parts.count == 3 ? EventWork(flags: parts[2]) : .unknown)
        case NotificationBus.feedChannel:
            guard let decoded = try? JSONDecoder().decode(FeedPayload.self, from: Data(payload.utf8)) else { return nil }
            self = .feedChanged(organisationID: decoded.org, userID: decoded.user, kind: decoded.kind)
        case NotificationBus.streamChannel:
            guard let decoded = try? JSONDecoder().decode(StreamPayload.self, from: Data(payload.utf8)) else { return nil }
            if let users = decoded.users {
                self = .streamsAdvanced(organisationID: decoded.org, userIDs: users)
            } else if let user = decoded.deactivated {
                self = .userDeactivated(organisationID: decoded.org, userID: user)
            } else if let session = decoded.session {
                self = .sessionRevoked(organisationID: decoded.org, sessionID: session)
            } else {
                return nil
            }
        default:
            return nil
        }
    }
}

/// A `herald_stream` payload (migration 0010): one of `users`, `deactivated`, `session`.
private struct StreamPayload: Decodable {
    var org: UUID
    var users: [UUID]?
    var deactivated: UUID?
    var session: UUID?
}

/// A `herald_feed` payload (migration 0008).
private struct FeedPayload: Decodable {
    var org: UUID
    var user: UUID
    var kind: FeedChange
}
