import Foundation
import HeraldStore
import Logging
import Metrics
import ServiceLifecycle
import Synchronization

/// How live streams behave (docs/realtime.md); from `AppConfiguration`.
public struct StreamSettings: Sendable {
    public var heartbeat: Duration = .seconds(20)
    public var perUser = 5
    public var perInstance = 20_000
    public var ticketLifetime: TimeInterval = 60
    public var retention: Duration = .seconds(24 * 3600)
    public var maxBacklog = 1000
    /// Between sweeps of rows whose deliver_at or expiry has come; nil: this instance does not sweep.
    public var sweepInterval: Duration? = .seconds(1)
    /// The retry hint (SSE `retry:`) sent at the start and when the server closes a stream.
    public var retryMilliseconds = 2000

    public init() {}

    public init(_ configuration: AppConfiguration) {
        heartbeat = .milliseconds(Int64(configuration.streamHeartbeatSeconds * 1000))
        perUser = configuration.streamsPerUser
        perInstance = configuration.streamsPerInstance
        ticketLifetime = configuration.streamTicketSeconds
        retention = .seconds(configuration.streamRetentionSeconds)
        maxBacklog = configuration.streamMaxBacklog
        sweepInterval = configuration.streamSweepSeconds > 0 ? .milliseconds(Int64(configuration.streamSweepSeconds * 1000)) : nil
    }
}

/// Why a stream ended on the server's side; sent to the client as the `end` event's reason.
enum StreamEnd: String, Sendable {
    /// The client's connection closed (nothing is sent).
    case clientGone = "client_gone"
    case shutdown
    case userDeactivated = "user_deactivated"
    case sessionRevoked = "session_revoked"
}

/// One open stream as the hub knows it: whom it serves, and how to wake it. The stream's own
/// task does all the reading and writing; the hub only flags and wakes.
final class StreamRegistration: Sendable {
    let id: UInt64
    let organisationID: UUID
    let userID: UUID
    let sessionID: UUID?
    let wakes: AsyncStream<Void>
    private let continuation: AsyncStream<Void>.Continuation
    private let flags = Mutex<(dirty: Bool, ended: StreamEnd?)>((true, nil))
    /// The number of the last change the stream wrote (nil until it has caught up once), and
    /// a page the hub read for it in a batch, to be used if it still starts there.
    private let position = Mutex<(cursor: Int64?, prefetched: PrefetchedPage?)>((nil, nil))

    init(id: UInt64, organisationID: UUID, userID: UUID, sessionID: UUID?) {
        self.id = id
        self.organisationID = organisationID
        self.userID = userID
        self.sessionID = sessionID
        // One pending wake is enough: the stream reads everything new whenever it wakes. The
        // first is there from the start: a stream replays before anything new arrives.
        (wakes, continuation) = AsyncStream.makeStream(of: Void.self, bufferingPolicy: .bufferingNewest(1))
        continuation.yield()
    }

    /// New changes may be waiting.
    func changed() {
        flags.withLock { $0.dirty = true }
        continuation.yield()
    }

    /// Time for a heartbeat check.
    func tick() { continuation.yield() }

    func end(_ reason: StreamEnd) {
        flags.withLock { if $0.ended == nil { $0.ended = reason } }
        continuation.yield()
    }

    /// Takes the dirty flag (the stream reads the log after this) and the end reason.
    func take() -> (dirty: Bool, ended: StreamEnd?) {
        flags.withLock { flags in
            defer { flags.dirty = false }
            return flags
        }
    }

    func finish() { continuation.finish() }

    /// Where the stream stands, for a batched read; nil while it replays or reads.
    var cursor: Int64? { position.withLock { $0.cursor } }

    /// The stream says where it stands (nil: it is reading on its own).
    func settle(at cursor: Int64?) { position.withLock { $0.cursor = cursor } }

    /// Hands the stream a page read in a batch, and wakes it. A page never replaces one whose
    /// read started later: batches are read side by side and may finish out of order, and an
    /// older page taken instead of a newer one would end the stream's step without the newer
    /// changes, whose wake it would already have used up.
    func offer(_ page: PrefetchedPage) {
        position.withLock { position in
            if let current = position.prefetched, current.read > page.read { return }
            position.prefetched = page
        }
        changed()
    }

    /// The page read for the stream, if it was read from where the stream stands.
    func takePrefetched(after cursor: Int64) -> PrefetchedPage? {
        position.withLock { position in
            defer { position.prefetched = nil }
            return position.prefetched?.after == cursor ? position.prefetched : nil
        }
    }
}

/// A stream's next changes and count, read by the hub for many streams in one transaction.
struct PrefetchedPage: Sendable {
    /// The order in which the hub started its reads (each read's snapshot is taken after this
    /// number is drawn): a page with a higher number has seen every change a lower one has.
    var read: UInt64
    var after: Int64
    var changes: [LoggedFeedChange]
    var count: UnreadCount
}

/// Refusals to open a stream.
enum StreamRefusal: Error {
    case tooManyForUser(limit: Int)
    case instanceFull
    case shuttingDown
}

/// Every stream open on this instance, woken through the notification bus: a change committed
/// through any instance reaches a client connected to this one, with one `LISTEN` connection
/// per process and no database connection per client (streams read the log in short
/// transactions when woken). Also sweeps, about once a second, the rows whose deliver_at or
/// expiry has come, so they are pushed when they become visible or leave the count.
public final class StreamHub: Service, Sendable {
    let bus: NotificationBus
    let database: Database
    let settings: StreamSettings
    let logger: Logger
    let now: @Sendable () -> Date
    private let state = Mutex<State>(State())
    /// Organisations whose new rows a stream here waits for (a commit of theirs, their first
    /// stream here, a bus that lost messages): the sweep numbers them at once, confined to them,
    /// instead of within its interval.
    private let sweepRequests = Mutex<Set<UUID>>([])
    /// Streams woken by the bus and waiting for a batched read, by organisation (`gather`).
    private let gathering = Mutex<[UUID: [(StreamRegistration, Int64)]]>([:])
    static let batchSize = 1000
    /// Gathered batches wait here for one of `batchReaders` readers, in the order the bus
    /// woke them.
    private let batches: AsyncStream<(UUID, [(StreamRegistration, Int64)])>
    private let batchQueue: AsyncStream<(UUID, [(StreamRegistration, Int64)])>.Continuation
    /// A few readers, not one task per batch: batches read all at once shared the cores and
    /// finished together, and every stream waited for the last; read a few at a time, the
    /// first batches' streams are written while the next are read.
    static let batchReaders = 2
    /// Numbers the batched reads in the order they start (`PrefetchedPage.read`).
    private let reads = Mutex<UInt64>(0)
    /// Calls of `feed_stream_sweep` this instance has made.
    private let sweepCalls = Mutex(0)

    private struct State {
        var next: UInt64 = 0
        var streams: [UInt64: StreamRegistration] = [:]
        var byUser: [UserKey: Set<UInt64>] = [:]
        /// How many streams each organisation has open here (`listen`: a commit of an
        /// organisation with none here does not make this instance sweep).
        var byOrganisation: [UUID: Int] = [:]
        var closing = false
    }

    struct UserKey: Hashable {
        var organisationID: UUID
        var userID: UUID
    }

    static let active = Gauge(label: "herald_streams_active")
    static let resyncs = Counter(label: "herald_stream_resyncs_total")
    static let drops = Counter(label: "herald_stream_drops_total")
    static let refusals = Counter(label: "herald_stream_refusals_total")
    static let pushLatency = Metrics.Timer(label: "herald_stream_push_latency_seconds", preferredDisplayUnit: .seconds)
    static let sweeps = Counter(label: "herald_stream_sweeps_total")

    public init(
        bus: NotificationBus, database: Database, settings: StreamSettings, logger: Logger,
        now: @escaping @Sendable () -> Date = { Date() }
    ) {
        self.now = now
        self.bus = bus
        self.database = database
        self.settings = settings
        var logger = logger
        logger[metadataKey: "component"] = "stream-hub"
        self.logger = logger
        (batches, batchQueue) = AsyncStream.makeStream()
    }

    /// Streams open now.
    public var count: Int { state.withLock { $0.streams.count } }

    /// Calls of the sweep this instance has made so far.
    var sweepsRun: Int { sweepCalls.withLock { $0 } }

    /// Registers a stream of `userID`, within the per-user and per-instance limits.
    func open(organisationID: UUID, userID: UUID, sessionID: UUID?) throws(StreamRefusal) -> StreamRegistration {
        // With whether it is the organisation's first stream here.
        let result: Result<(StreamRegistration, Bool), StreamRefusal> = state.withLock { state in
            guard !state.closing else { return .failure(.shuttingDown) }
            guard state.streams.count < settings.perInstance else { return .failure(.instanceFull) }
            let key = UserKey(organisationID: organisationID, userID: userID)
            guard state.byUser[key, default: []].count < settings.perUser else {
                return .failure(.tooManyForUser(limit: settings.perUser))
            }
            state.next += 1
            let registration = StreamRegistration(id: state.next, organisationID: organisationID, userID: userID, sessionID: sessionID)
            state.streams[registration.id] = registration
            state.byUser[key, default: []].insert(registration.id)
            state.byOrganisation[organisationID, default: 0] += 1
            return .success((registration, state.byOrganisation[organisationID] == 1))
        }
        switch result {
        case .success(let (registration, first)):
            // Rows committed while no stream of the organisation was here were left to the interval.
            if first { sweepRequests.withLock { _ = $0.insert(organisationID) } }
            Self.active.record(count)
            return registration
        case .failure(let refusal):
            Self.refusals.increment()
            throw refusal
        }
    }

    func close(_ registration: StreamRegistration) {
        state.withLock { state in
            guard state.streams.removeValue(forKey: registration.id) != nil else { return }
            let open = state.byOrganisation[registration.organisationID, default: 1] - 1
            state.byOrganisation[registration.organisationID] = open > 0 ? open : nil
            let key = UserKey(organisationID: registration.organisationID, userID: registration.userID)
            state.byUser[key]?.remove(registration.id)
            if state.byUser[key]?.isEmpty == true { state.byUser[key] = nil }
        }
        registration.finish()
        Self.active.record(count)
    }

    /// Listens, beats and sweeps until a shutdown, then ends whatever streams are still open.
    /// (`herald serve` ends them earlier, before the HTTP server drains: `shutDown()`.)
    public func run() async throws {
        await cancelWhenGracefulShutdown {
            await withTaskGroup(of: Void.self) { group in
                group.addTask { await self.listen() }
                group.addTask { await self.beat() }
                for _ in 0..<Self.batchReaders {
                    group.addTask {
                        for await (organisationID, streams) in self.batches { await self.prefetch(streams, in: organisationID) }
                    }
                }
                group.addTask { await self.sweep(every: self.settings.sweepInterval) }
                await group.waitForAll()
            }
        }
        endAll(.shutdown)
    }

    /// Ends every open stream with a retry hint and refuses new ones: the first step of a
    /// shutdown, before the HTTP server drains (it would wait for ever on open streams).
    public func shutDown() { endAll(.shutdown) }

    /// Ends every open stream (shutdown) and refuses new ones.
    func endAll(_ reason: StreamEnd) {
        let streams = state.withLock { state in
            state.closing = true
            return Array(state.streams.values)
        }
        for stream in streams { stream.end(reason) }
    }

    private func listen() async {
        for await message in bus.subscribe() {
            if Task.isCancelled { return }
            switch message {
            case .streamsAdvanced(let organisationID, let userIDs):
                let woken = state.withLock { state in
                    userIDs.flatMap { user in
                        (state.byUser[UserKey(organisationID: organisationID, userID: user)] ?? []).compactMap { state.streams[$0] }
                    }
                }
                // A fan-out wakes many streams at once: one read for all of them instead of a
                // transaction each (streams that are busy reading on their own are just woken).
                let settled = woken.compactMap { stream in stream.cursor.map { (stream, $0) } }
                if settled.count >= 2 {
                    let busy = woken.filter { $0.cursor == nil }
                    for stream in busy { stream.changed() }
                    gather(settled, in: organisationID)
                } else {
                    for stream in woken { stream.changed() }
                }
            case .userDeactivated(let organisationID, let userID):
                let ended = state.withLock { state in
                    (state.byUser[UserKey(organisationID: organisationID, userID: userID)] ?? []).compactMap { state.streams[$0] }
                }
                for stream in ended { stream.end(.userDeactivated) }
            case .sessionRevoked(let organisationID, let sessionID):
                let ended = state.withLock { state in
                    state.streams.values.filter { $0.organisationID == organisationID && $0.sessionID == sessionID }
                }
                for stream in ended { stream.end(.sessionRevoked) }
            case .missedMessages:
                // The bus may have lost messages: sweep for the organisations streamed here, and
                // every stream reads its log again.
                let streamed = Set(state.withLock { $0.byOrganisation.keys })
                sweepRequests.withLock { $0.formUnion(streamed) }
                for stream in state.withLock({ Array($0.streams.values) }) { stream.changed() }
            case .eventCommitted(let organisationID, _, _):
                // Its rows wait in feed_due: number them now if a stream here may be waiting for
                // them. Every instance hears every commit; one with no stream of the organisation
                // leaves the rows to the instances that have one (they sweep on the same message)
                // or to its own sweep within `interval`. Before, every instance swept on every
                // commit anywhere: under one organisation's flood of notifies (make bench,
                // fairness) three instances ran 145 sweeps a second, 1.4 cores of PostgreSQL.
                if state.withLock({ $0.byOrganisation[organisationID] != nil }) {
                    sweepRequests.withLock { _ = $0.insert(organisationID) }
                }
            case .feedChanged:
                break
            }
        }
    }

    /// Collects the streams of one organisation that the bus's messages wake for a batched read.
    /// A sweep's messages (150 users each) arrive within a few milliseconds: the streams they
    /// wake are read in batches of up to `batchSize`, each started when full or a few
    /// milliseconds after its first streams came, instead of a transaction per message.
    private func gather(_ streams: [(StreamRegistration, Int64)], in organisationID: UUID) {
        let (opened, full) = gathering.withLock { gathering -> (Bool, [(StreamRegistration, Int64)]?) in
            let opened = gathering[organisationID] == nil
            gathering[organisationID, default: []].append(contentsOf: streams)
            if gathering[organisationID, default: []].count >= Self.batchSize {
                return (false, gathering.removeValue(forKey: organisationID))
            }
            return (opened, nil)
        }
        if let full { batchQueue.yield((organisationID, full)) }
        if opened {
            Task {
                try? await Task.sleep(for: .milliseconds(5))
                if let rest = self.gathering.withLock({ $0.removeValue(forKey: organisationID) }) {
                    self.batchQueue.yield((organisationID, rest))
                }
            }
        }
    }

    /// Reads the next page of each stream in one transaction of their organisation and hands
    /// it over; on failure the streams read on their own.
    private func prefetch(_ streams: [(StreamRegistration, Int64)], in organisationID: UUID) async {
        let pageSize = FeedStreamSession.pageSize
        var positions: [UUID: Int64] = [:]
        for (stream, cursor) in streams { positions[stream.userID] = min(positions[stream.userID] ?? cursor, cursor) }
        let read = reads.withLock { count in
            count += 1
            return count
        }
        do {
            let now = now()
            let (changes, counts) = try await database.withTenant(organisationID) { tx in
                let changes = try await tx.feedChanges(after: positions, limit: pageSize, now: now)
                let counts = try await tx.unreadCounts(of: Array(positions.keys), now: now)
                return (changes, counts)
            }
            for (stream, cursor) in streams {
                let mine = changes[stream.userID] ?? []
                guard positions[stream.userID] == cursor, let count = counts[stream.userID] else {
                    stream.changed()
                    continue
                }
                stream.offer(PrefetchedPage(read: read, after: cursor, changes: mine, count: count))
            }
        } catch {
            logger.warning("batched stream read failed; streams read alone", metadata: ["error": "\(String(reflecting: error))"])
            for (stream, _) in streams { stream.changed() }
        }
    }

    /// How many times per heartbeat interval the hub wakes every stream.
    static let beatsPerHeartbeat = 4

    /// Wakes every stream four times per heartbeat interval; each decides whether it owes one
    /// (`FeedStreamSession.owesHeartbeat`). Woken twice per interval, a stream that wrote just
    /// after a wake went up to one and a half intervals without a byte (30 s: past a proxy's
    /// 30 s idle timeout).
    private func beat() async {
        while !Task.isCancelled {
            try? await Task.sleep(for: settings.heartbeat / Self.beatsPerHeartbeat)
            for stream in state.withLock({ Array($0.streams.values) }) { stream.tick() }
        }
    }

    /// One call of `feed_stream_sweep`: numbers up to `limit` due rows (of `organisation`, or of
    /// every organisation); returns how many.
    private func sweepOnce(limit: Int, now: Date, organisation: UUID? = nil) async throws -> Int {
        sweepCalls.withLock { $0 += 1 }
        Self.sweeps.increment()
        return try await database.sweepFeedStreams(limit: limit, retention: settings.retention, now: now, organisation: organisation)
    }

    /// Numbers what is due (new rows, deliver_at and expiry reached) and trims the log: every
    /// `interval` for every organisation (nil: never, another instance does), and at once for an
    /// organisation whose rows a stream here waits for (`sweepRequests`), confined to it so that
    /// another organisation's backlog (a fan-out nobody streams, numbered within the interval)
    /// does not hold it back.
    private func sweep(every interval: Duration?) async {
        // One batch of up to 10 000. Batches of 1 000 (each announcing its users at its commit,
        // so early streams could read while later users were numbered) were measured slower:
        // the ten sweeps of a 10 000-member fan-out ended 2.2 s after the 202 instead of 0.5 s,
        // and the fan-out's p99 went from 1.3 s to 2.3 s (docs/benchmarks.md).
        let batch = 10_000
        // Two sweeps at once, each of half the batch, while more is due than one of them takes:
        // a sweep is one PostgreSQL backend, busy while the instance waits for it, so two use both
        // cores of the database. They take disjoint rows (SKIP LOCKED); a user whose stream row one
        // of them holds is skipped by the other, so after a parallel round that numbered anything,
        // one more sweep runs alone at once and takes what was skipped. A round starts with one
        // sweep: a notify to a few users is one call, not three (each call plans its statements,
        // about a millisecond even when nothing is due).
        let sweepers = 2
        let share = batch / sweepers
        // Two sweeps of every organisation at once: full batches keep coming.
        var parallel = false
        // One sweep of every organisation: at the start, each interval, after a parallel round.
        var alone = interval != nil
        // Organisations asked for and not yet swept.
        var asked: Set<UUID> = []
        while !Task.isCancelled {
            do {
                if parallel {
                    asked = []
                    let now = now()
                    let logged = try await withThrowingTaskGroup(of: Int.self) { group in
                        for _ in 0..<sweepers {
                            group.addTask { try await self.sweepOnce(limit: share, now: now) }
                        }
                        return try await group.reduce(0, +)
                    }
                    // Full: more are due at once. Else one sweep alone for what each skipped.
                    parallel = logged >= batch
                    alone = !parallel && logged > 0
                    if parallel || alone { continue }
                } else if alone {
                    asked = []
                    alone = false
                    // A full share: more are due, in parallel.
                    if try await sweepOnce(limit: share, now: now()) >= share {
                        parallel = true
                        continue
                    }
                } else if !asked.isEmpty {
                    var full = false
                    for organisation in asked {
                        if try await sweepOnce(limit: share, now: now(), organisation: organisation) >= share { full = true }
                    }
                    asked = []
                    if full {
                        parallel = true
                        continue
                    }
                }
            } catch {
                (parallel, alone, asked) = (false, false, [])
                logger.warning("stream sweep failed", metadata: ["error": "\(String(reflecting: error))"])
            }
            // Until the interval passes or an organisation is asked for.
            let next = interval.map { ContinuousClock.now + $0 }
            while !Task.isCancelled {
                asked.formUnion(
                    sweepRequests.withLock { requests in
                        defer { requests = [] }
                        return requests
                    })
                if !asked.isEmpty { break }
                if let next, ContinuousClock.now >= next {
                    alone = true
                    break
                }
                try? await Task.sleep(for: .milliseconds(20))
            }
        }
    }
}
