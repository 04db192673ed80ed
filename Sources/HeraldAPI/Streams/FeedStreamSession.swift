import Foundation
import HeraldCore
import HeraldStore
import Logging
import Metrics

/// One event of a live stream (docs/realtime.md). `id` is the number of the user's change it
/// reports (an `unread_count` carries the number of the last change it includes).
struct StreamEvent: Sendable, Equatable {
    var id: Int64
    var name: String
    /// JSON.
    var data: String

    /// Server-Sent Events framing.
    var sse: String { "id: \(id)\nevent: \(name)\ndata: \(data)\n\n" }

    /// One WebSocket text message.
    var websocket: String { "{\"id\":\(id),\"event\":\"\(name)\",\"data\":\(data)}" }
}

/// What a stream writes: events, heartbeats, and a last word when the server ends it.
enum StreamOutput: Sendable, Equatable {
    case retry(milliseconds: Int)
    case event(StreamEvent)
    case heartbeat
}

/// Where a stream starts: after a change the client has seen, or (nil) from now.
struct StreamStart: Sendable {
    var organisationID: UUID
    var userID: UUID
    var sessionID: UUID?
    var since: Int64?
}

/// What one step of a stream produced: what to write, where the stream then stands, and
/// whether it ends once that is written.
struct StreamStep: Sendable {
    var output: [StreamOutput] = []
    var cursor: Int64
    var finished = false
    /// When each live change written was logged: push latency, recorded once it is written.
    var logged: [Date] = []
    /// How many changes the step has caught up so far (`maxBacklog`).
    var sent = 0
}

/// The loop behind one connection, whatever its transport: tell the client where it stands,
/// replay what it missed, then read and send the user's new changes each time the hub wakes it.
/// Live and replay are the same read (`feed_changes` after the last number sent), so a change
/// is sent once whether it arrived before, during or after a reconnect.
///
/// The loop itself only waits and writes. Each read (the opening one, and one per wake) runs in
/// a child task and hands back what to write: a task keeps the largest stack of frames it ever
/// needed until it ends, and the reads' frames (transactions, rows, JSON) were most of an idle
/// stream's memory when they ran in the stream's own task.
struct FeedStreamSession: Sendable {
    let hub: StreamHub
    let registration: StreamRegistration
    let start: StreamStart
    let now: @Sendable () -> Date
    let logger: Logger

    static let pageSize = 200
    static let events = Counter(label: "herald_stream_events_total")

    /// Runs until the client goes (a write throws), the server ends the stream, or the client
    /// must resynchronise. Each call of `write` gets the events of one step, to be sent
    /// together. Always unregisters.
    ///
    /// This frame and the one of `wake` stay in the connection's task for the life of the
    /// stream (beside those of the transport's writer): each is kept small, and the work of a
    /// step is in the functions they call, not inlined into them.
    func run(write: ([StreamOutput]) async throws -> Void) async throws {
        defer { hub.close(registration) }
        guard var place = try await begin(write: write) else { return }
        for await _ in registration.wakes {
            if try await wake(&place, write: write) == .stop { return }
        }
    }

    /// Where a running stream stands between wakes.
    struct Place: Sendable {
        var cursor: Int64
        var lastWrite: ContinuousClock.Instant
        /// Whether replay is over: push latency is measured on live changes only (a replay's
        /// are as old as the client's absence).
        var live = false
    }

    enum Next { case go, stop }

    /// The opening read and its words; nil when the stream ends with them (`resync`).
    @inline(never)
    private func begin(write: ([StreamOutput]) async throws -> Void) async throws -> Place? {
        let opened = try await inChildTask { try await self.open() }
        try await write(opened.output)
        // The first wake is already pending (a registration starts dirty): it replays.
        return opened.finished ? nil : Place(cursor: opened.cursor, lastWrite: .now)
    }

    /// One wake: the end of the stream, new changes to send, or a heartbeat owed.
    @inline(never)
    private func wake(_ place: inout Place, write: ([StreamOutput]) async throws -> Void) async throws -> Next {
        let (dirty, ended) = registration.take()
        if ended == .clientGone { return .stop }
        if let ended {
            try? await write(ending(ended, at: place.cursor))
            return .stop
        }
        if dirty {
            // A page the hub read in a batch (a fan-out) becomes events here, without a child
            // task: that work is synchronous (the thread's stack, not the task's). Reading
            // more is done in one.
            var step = StreamStep(cursor: place.cursor)
            if usePrefetched(into: &step, live: place.live) {
                step = try await inChildTask { [step, live = place.live] in try await self.catchUp(from: step, live: live) }
            }
            if !step.output.isEmpty {
                try await write(step.output)
                place.lastWrite = .now
            }
            Self.recordLatency(of: step.logged)
            if step.finished { return .stop }
            place.cursor = step.cursor
            place.live = true
            registration.settle(at: place.cursor)
        }
        if Self.owesHeartbeat(sinceLastWrite: ContinuousClock.now - place.lastWrite, heartbeat: hub.settings.heartbeat) {
            try await write([.heartbeat])
            place.lastWrite = .now
        }
        return .go
    }

    /// Whether a wake of the hub's beat (every quarter of `heartbeat`) owes a heartbeat: when
    /// the next wake would come past `heartbeat` since the last write. So a quiet stream writes
    /// something every 15 to 20 s (with the default 20 s), never more than `heartbeat` apart.
    static func owesHeartbeat(sinceLastWrite elapsed: Duration, heartbeat: Duration) -> Bool {
        elapsed >= heartbeat - heartbeat / StreamHub.beatsPerHeartbeat
    }

    /// The last words of a stream the server ends: when to reconnect, and why.
    private func ending(_ ended: StreamEnd, at cursor: Int64) -> [StreamOutput] {
        [
            .retry(milliseconds: hub.settings.retryMilliseconds),
            .event(StreamEvent(id: cursor, name: "end", data: "{\"reason\":\"\(ended.rawValue)\"}")),
        ]
    }

    private static func recordLatency(of logged: [Date]) {
        for logged in logged {
            StreamHub.pushLatency.recordNanoseconds(Int64(max(0, Date().timeIntervalSince(logged)) * 1_000_000_000))
        }
    }

    /// The stream's first words: the retry hint and the unread count where it starts (now, or
    /// `since` when nothing came after it; a replay ends with its own), or `resync` when it
    /// cannot start there.
    private func open() async throws -> StreamStep {
        let settings = hub.settings
        var step = StreamStep(output: [.retry(milliseconds: settings.retryMilliseconds)], cursor: 0)
        // Where the user's log stands and the unread count, in one transaction. On the user's
        // first stream ever there is no log yet: it is begun in a transaction of its own (its lock
        // held for one statement), then both are read again, the order migration 0043 relies on.
        let positionAndCount = { @Sendable () async throws -> (FeedStreamPosition?, UnreadCount) in
            try await read { tx in
                (try await tx.feedStream(of: start.userID), try await tx.unreadCount(of: start.userID, now: now()))
            }
        }
        var (found, count) = try await positionAndCount()
        if found == nil {
            _ = try await read { tx in try await tx.openFeedStream(of: start.userID) }
            (found, count) = try await positionAndCount()
        }
        let position = found ?? FeedStreamPosition(seq: 0, purgedThrough: 0)
        step.cursor = position.seq
        if let since = start.since {
            if since < position.purgedThrough || since > position.seq || position.seq - since > Int64(settings.maxBacklog) {
                resync(&step, reason: since > position.seq ? "unknown_position" : "too_far_behind", at: position.seq)
                return step
            }
            step.cursor = since
            // Behind: the replay's pages each end with the count after them. A count now would
            // reflect changes not yet sent, under the id the client resumed from.
            if since < position.seq { return step }
        }
        step.output.append(.event(StreamEvent(id: step.cursor, name: "unread_count", data: FeedJSON.unreadCount(count))))
        return step
    }

    /// Adds the page the hub read for this stream, if it starts where the stream stands, to
    /// `step`; true when the log must be read (no such page, or a full one: more may follow).
    private func usePrefetched(into step: inout StreamStep, live: Bool) -> Bool {
        guard let page = registration.takePrefetched(after: step.cursor) else { return true }
        return add(page.changes, count: page.count, to: &step, live: live)
    }

    /// Everything logged after `step`'s cursor, page by page: the events and the unread count
    /// after each page; `resync` when there is too much to catch up change by change.
    private func catchUp(from step: StreamStep, live: Bool) async throws -> StreamStep {
        var step = step
        registration.settle(at: nil)
        while !step.finished {
            let after = step.cursor
            let (changes, count) = try await read { tx in
                let changes = try await tx.feedChanges(of: start.userID, after: after, limit: Self.pageSize, now: now())
                let count = changes.isEmpty ? nil : try await tx.unreadCount(of: start.userID, now: now())
                return (changes, count)
            }
            if !add(changes, count: count, to: &step, live: live) { break }
        }
        return step
    }

    /// One page's events and the unread count after it; true when the page was full (more
    /// may be waiting). Ends the step with `resync` past the backlog a stream may catch up.
    private func add(_ changes: [LoggedFeedChange], count: UnreadCount?, to step: inout StreamStep, live: Bool) -> Bool {
        guard let last = changes.last else { return false }
        step.sent += changes.count
        if step.sent > hub.settings.maxBacklog {
            // Too far behind to catch up change by change: refetch instead.
            StreamHub.drops.increment()
            resync(&step, reason: "too_far_behind", at: last.seq)
            return false
        }
        for change in changes {
            if let event = Self.event(for: change) {
                step.output.append(.event(event))
                Self.events.increment()
            }
            if live { step.logged.append(change.loggedAt) }
            step.cursor = change.seq
        }
        if let count {
            step.output.append(.event(StreamEvent(id: step.cursor, name: "unread_count", data: FeedJSON.unreadCount(count))))
        }
        // Fewer than a page: nothing more was waiting.
        return changes.count >= Self.pageSize
    }

    private func resync(_ step: inout StreamStep, reason: String, at seq: Int64) {
        StreamHub.resyncs.increment()
        logger.info("stream told to resynchronise", metadata: ["reason": "\(reason)"])
        step.output.append(.event(StreamEvent(id: seq, name: "resync", data: "{\"reason\":\"\(reason)\"}")))
        step.finished = true
    }

    /// A short transaction confined to the user's rows.
    private func read<Result: Sendable>(_ body: (TenantTransaction) async throws -> Result) async throws -> Result {
        try await hub.database.withTenant(start.organisationID, actor: .user(start.userID), recipient: start.userID, body)
    }

    /// The event a change becomes; nil for a created row that is gone again (its removal
    /// follows in the log) or not visible.
    static func event(for change: LoggedFeedChange) -> StreamEvent? {
        switch change.kind {
        case .created:
            guard let item = change.item else { return nil }
            return StreamEvent(id: change.seq, name: "notification.created", data: FeedJSON.feedItem(item))
        case .read, .unread, .archived, .deleted, .expired:
            guard let id = change.notificationID else { return nil }
            let data =
                "{\"change\":\"\(change.kind.rawValue)\",\"id\":\"\(id.lowercased)\",\"notification\":\(change.item.map(FeedJSON.feedItem) ?? "null")}"
            return StreamEvent(id: change.seq, name: "notification.updated", data: data)
        case .readAll:
            return StreamEvent(id: change.seq, name: "feed.read_all", data: "{}")
        case .cleared:
            return StreamEvent(id: change.seq, name: "feed.cleared", data: "{}")
        }
    }

    /// The same bytes the REST API writes: sorted keys, unescaped slashes, RFC 3339 dates.
    /// Made once: every event of every stream goes through it.
    private static let encoder: JSONEncoder = {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        encoder.dateEncodingStrategy = .custom { date, encoder in
            var container = encoder.singleValueContainer()
            try container.encode(date.formatted(.iso8601))
        }
        return encoder
    }()

    static func json<Value: Encodable>(_ value: Value) throws -> String {
        String(decoding: try encoder.encode(value), as: UTF8.self)
    }
}
