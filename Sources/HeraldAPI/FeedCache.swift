import Foundation
import HTTPTypes
import HeraldStore
import Metrics
import ServiceLifecycle
import Synchronization

/// The responses of the bell's two reads (`GET /v1/me/notifications`, `GET
/// /v1/me/notifications/unread-count`) kept for a few seconds per user, so a burst of reads (a
/// page load, several tabs, a poller) costs the database one read (issue 12; docs/scaling.md).
///
/// An entry is dropped as soon as anything says the user's feed may have changed:
/// - the bus (`NotificationBus`): a statement that changed the user's rows (`herald_feed`),
///   new numbered changes for the user (`herald_stream`: rows shown, expired), an event of the
///   organisation committed (`herald_events`: every user of the organisation), a deactivation;
///   the bus's `missedMessages` drops everything;
/// - this instance's own requests: any request that may write (not GET or HEAD) and every
///   signed link drops the organisation's entries when it succeeds, before its response leaves,
///   so a client reads its own writes here without waiting for the bus;
/// - the time: an entry is served for at most `lifetime` by the injected clock, which bounds
///   what no message announces (a role or catalogue change made through another instance).
///
/// While the bus is not listening nothing is served from the cache (its messages would be
/// lost). A read that started before an invalidation is not kept: each read takes a ticket
/// before it reads, and an entry is stored only if nothing of its user or organisation was
/// invalidated after that ticket.
public final class FeedCache: Service, Sendable {
    /// The operations whose responses are kept.
    static let operations: Set<String> = ["listMyNotifications", "getMyUnreadCount"]

    /// Whether `target` (path and query) is one of the bell's reads: the count, and a first page
    /// with at most a size. Pages with a cursor, a search or filters are not kept, so one user
    /// cannot fill the cache with a key per query.
    static func keeps(operationID: String, target: String) -> Bool {
        guard operations.contains(operationID) else { return false }
        guard let query = target.split(separator: "?", maxSplits: 1).dropFirst().first else { return true }
        let items = query.split(separator: "&")
        return items.count == 1 && items[0].hasPrefix("limit=") && items[0].dropFirst(6).allSatisfy(\.isNumber)
    }

    struct Key: Hashable, Sendable {
        var organisationID: UUID
        var userID: UUID
        /// The request's path with its query: each page, filter and size is its own entry.
        var target: String
    }

    struct Entry: Sendable {
        var response: HTTPResponse
        var body: [UInt8]
        var stored: Date

        /// What the entry holds in memory, about: its body, its target and its header fields.
        func size(_ key: Key) -> Int {
            body.count + key.target.utf8.count + response.headerFields.reduce(64) { $0 + $1.name.rawName.utf8.count + $1.value.utf8.count }
        }
    }

    private struct UserKey: Hashable {
        var organisationID: UUID
        var userID: UUID
    }

    private struct State {
        var entries: [UUID: [UUID: [String: Entry]]] = [:]
        var bytes = 0
        /// Increases with every ticket and invalidation.
        var clock: UInt64 = 0
        /// When each organisation and user was last invalidated (the clock's value).
        var organisationInvalidated: [UUID: UInt64] = [:]
        var userInvalidated: [UserKey: UInt64] = [:]
        /// Tickets below it may not store: the invalidation records before it were forgotten.
        var floor: UInt64 = 0
        /// The read under way for a key, by its ticket, and the requests waiting for it.
        var flights: [Key: (ticket: UInt64, waiters: [CheckedContinuation<Entry?, Never>])] = [:]

        /// Whether a read that took `ticket` before reading may still be kept for `key`.
        func keeps(_ ticket: UInt64, for key: Key) -> Bool {
            ticket >= floor && ticket > organisationInvalidated[key.organisationID] ?? 0
                && ticket > userInvalidated[UserKey(organisationID: key.organisationID, userID: key.userID)] ?? 0
        }
    }

    /// What a request does about a cacheable read.
    enum Begin {
        /// Answer with the kept response.
        case hit(Entry)
        /// Read, then `finish` with this ticket (`leads`: other requests may be waiting for it).
        case read(ticket: UInt64, leads: Bool)
    }

    let lifetime: TimeInterval
    let maxBytes: Int
    let bus: NotificationBus
    let now: @Sendable () -> Date
    private let state = Mutex(State())
    /// The bus's connection generation whose `missedMessages` this cache has handled: until it
    /// is the bus's current one, messages may have been lost and nothing is served.
    private let synced = Atomic<UInt64>(0)
    /// Requests answered from the cache and reads made, for tests (the metrics are process-wide).
    let counts = Mutex<(hits: Int, reads: Int)>((0, 0))

    static let hits = Counter(label: "herald_feed_cache_hits_total")
    static let misses = Counter(label: "herald_feed_cache_misses_total")

    /// `lifetime` in seconds (more than 0); `maxBytes`: past it the cache starts again empty.
    public init(
        lifetime: TimeInterval, maxBytes: Int = 32 << 20, bus: NotificationBus,
        now: @escaping @Sendable () -> Date = { Date() }
    ) {
        self.lifetime = lifetime
        self.maxBytes = maxBytes
        self.bus = bus
        self.now = now
    }

    /// A kept response younger than `lifetime`, else the read this request is to make. Requests
    /// that miss while the same read is under way (and nothing invalidated it since it started)
    /// wait for it instead of reading too: the tabs that all miss after a change cost one read.
    /// Nothing is kept or shared while the bus is not listening.
    func begin(_ key: Key) async -> Begin {
        guard isServing else { return .read(ticket: 0, leads: false) }
        enum Step {
            case hit(Entry)
            case lead(UInt64, abandoned: [CheckedContinuation<Entry?, Never>])
            case follow
        }
        let now = now()
        let step = state.withLock { state -> Step in
            if let entry = state.entries[key.organisationID]?[key.userID]?[key.target] {
                if now >= entry.stored, now.timeIntervalSince(entry.stored) < lifetime { return .hit(entry) }
                state.entries[key.organisationID]?[key.userID]?[key.target] = nil
                state.bytes -= entry.size(key)
            }
            if let flight = state.flights[key], state.keeps(flight.ticket, for: key) { return .follow }
            // A read that can no longer be kept is not waited for; its waiters read for themselves.
            let abandoned = state.flights[key]?.waiters ?? []
            state.clock += 1
            state.flights[key] = (state.clock, [])
            return .lead(state.clock, abandoned: abandoned)
        }
        switch step {
        case .hit(let entry):
            Self.hits.increment()
            counts.withLock { $0.hits += 1 }
            return .hit(entry)
        case .lead(let ticket, let abandoned):
            for waiter in abandoned { waiter.resume(returning: nil) }
            Self.misses.increment()
            counts.withLock { $0.reads += 1 }
            return .read(ticket: ticket, leads: true)
        case .follow:
            let shared = await withCheckedContinuation { continuation in
                let joined = state.withLock { state -> Bool in
                    guard var flight = state.flights[key], state.keeps(flight.ticket, for: key) else { return false }
                    flight.waiters.append(continuation)
                    state.flights[key] = flight
                    return true
                }
                if !joined { continuation.resume(returning: nil) }
            }
            if let shared {
                Self.hits.increment()
                counts.withLock { $0.hits += 1 }
                return .hit(shared)
            }
            Self.misses.increment()
            counts.withLock { $0.reads += 1 }
            return .read(ticket: ticket(), leads: false)
        }
    }

    /// Taken before a read whose response may be kept.
    func ticket() -> UInt64 {
        state.withLock { state in
            state.clock += 1
            return state.clock
        }
    }

    /// Ends the read that `begin` asked for: keeps `response` (nil: the read failed or is not
    /// to be kept) unless its user or organisation was invalidated after `ticket`, and hands
    /// what was kept to the requests waiting for it (nil: they read for themselves).
    func finish(_ key: Key, ticket: UInt64, response: (HTTPResponse, [UInt8])?) {
        let entry = response.map { Entry(response: $0.0, body: $0.1, stored: now()) }
        let (kept, waiters) = state.withLock { state -> (Entry?, [CheckedContinuation<Entry?, Never>]) in
            var waiters: [CheckedContinuation<Entry?, Never>] = []
            if let flight = state.flights[key], flight.ticket == ticket {
                waiters = flight.waiters
                state.flights[key] = nil
            }
            guard let entry, ticket > 0, state.keeps(ticket, for: key), entry.size(key) <= maxBytes / 64 else { return (nil, waiters) }
            if state.bytes + entry.size(key) > maxBytes {
                state.entries = [:]
                state.bytes = 0
            }
            let replaced = state.entries[key.organisationID, default: [:]][key.userID, default: [:]].updateValue(entry, forKey: key.target)
            state.bytes += entry.size(key) - (replaced?.size(key) ?? 0)
            return (entry, waiters)
        }
        for waiter in waiters { waiter.resume(returning: kept) }
    }

    /// Whether the cache may serve now: the bus listens and no message of its current
    /// connection can have been lost to this cache.
    var isServing: Bool {
        bus.listenerProcessID != nil && synced.load(ordering: .acquiring) == bus.connectionGeneration
    }

    /// The requests waiting for the read under way for `key` (tests).
    func waiting(for key: Key) -> Int {
        state.withLock { $0.flights[key]?.waiters.count ?? 0 }
    }

    /// After a request of this instance that may have written, before its answer leaves: a
    /// user's own routes (`/v1/me/…`: their feed, preferences, stream tickets) drop only that
    /// user's entries, any other write the organisation's.
    func wrote(organisationID: UUID, by userID: UUID?, path: String) {
        if let userID, path.hasPrefix("/v1/me/") {
            invalidate(organisationID: organisationID, users: [userID])
        } else {
            invalidate(organisationID: organisationID)
        }
    }

    /// Drops the entries of these users of the organisation, and what is being read for them.
    public func invalidate(organisationID: UUID, users: [UUID]) {
        state.withLock { state in
            state.clock += 1
            for user in users {
                if let dropped = state.entries[organisationID]?.removeValue(forKey: user) {
                    state.bytes -= dropped.reduce(0) {
                        $0 + $1.value.size(Key(organisationID: organisationID, userID: user, target: $1.key))
                    }
                }
                state.userInvalidated[UserKey(organisationID: organisationID, userID: user)] = state.clock
            }
            Self.forgetOldRecords(&state)
        }
    }

    /// Drops every entry of the organisation, and what is being read for it.
    public func invalidate(organisationID: UUID) {
        state.withLock { state in
            state.clock += 1
            if let dropped = state.entries.removeValue(forKey: organisationID) {
                for (user, targets) in dropped {
                    state.bytes -= targets.reduce(0) {
                        $0 + $1.value.size(Key(organisationID: organisationID, userID: user, target: $1.key))
                    }
                }
            }
            state.organisationInvalidated[organisationID] = state.clock
            Self.forgetOldRecords(&state)
        }
    }

    /// Drops everything, and what is being read.
    public func invalidateAll() {
        state.withLock { state in
            state.clock += 1
            state.entries = [:]
            state.bytes = 0
            state.organisationInvalidated = [:]
            state.userInvalidated = [:]
            state.floor = state.clock + 1
        }
    }

    /// Invalidation records are kept until there are many; then all are forgotten at once and
    /// reads that started before may no longer store (they read again next time).
    private static func forgetOldRecords(_ state: inout State) {
        guard state.userInvalidated.count + state.organisationInvalidated.count > 100_000 else { return }
        state.organisationInvalidated = [:]
        state.userInvalidated = [:]
        state.floor = state.clock + 1
    }

    /// Follows the bus until shutdown.
    public func run() async throws {
        await cancelWhenGracefulShutdown {
            let messages = self.bus.subscribe()
            // From here on no message is lost to this cache (it is empty, or emptied now).
            self.invalidateAll()
            self.synced.store(self.bus.connectionGeneration, ordering: .releasing)
            for await message in messages {
                if Task.isCancelled { return }
                self.apply(message)
            }
        }
    }

    func apply(_ message: BusMessage) {
        switch message {
        case .feedChanged(let organisationID, let userID, _), .userDeactivated(let organisationID, let userID):
            invalidate(organisationID: organisationID, users: [userID])
        case .streamsAdvanced(let organisationID, let userIDs):
            invalidate(organisationID: organisationID, users: userIDs)
        case .eventCommitted(let organisationID, _, _):
            invalidate(organisationID: organisationID)
        case .missedMessages:
            // The generation read after emptying: a reconnection after it sends another.
            invalidateAll()
            synced.store(bus.connectionGeneration, ordering: .releasing)
        case .sessionRevoked:
            // A hit is refused before the cache is asked (SessionLiveness): nothing to drop.
            break
        }
    }
}
