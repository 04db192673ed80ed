import Foundation
import HeraldCore
import HeraldStore
import Logging
import Metrics

extension ClaimedDelivery: WorkClaim {
    public var logMetadata: Logger.Metadata {
        ["organisation_id": .string(organisationID.lowercased), "delivery_id": .string(deliveryID.lowercased), "attempt": "\(attempt)"]
    }
}

/// How one delivery attempt ended, as the outbox records it with the attempt's side effects on
/// its endpoint (in one statement, or one tenant transaction when an endpoint went or did not
/// answer: `OutboxQueue.record`).
public struct DeliveryAttemptRecord: Sendable {
    /// The delivery's channel (metric label).
    public var channel: NotificationChannel
    public var result: AttemptResult
    /// The receiver answered 410 Gone: the endpoint is disabled.
    public var goneEndpoint: UUID?
    /// Whether the endpoint answered at all, when the attempt held one of its send slots: what
    /// the circuit breaker counts.
    public var endpointAnswered: (endpoint: UUID, answered: Bool)?
    /// The URL it was sent to, when the delivery row names another (the endpoint moved since).
    public var destination: String?
}

/// The circuit breaker's rule: this many attempts in a row without an answer pause an endpoint
/// for `cooldown` seconds.
public struct CircuitRule: Sendable {
    public var failures: Int
    public var cooldown: TimeInterval
}

/// The delivery outbox as a `WorkQueue`: the first kind of work on the runner.
///
/// Claims go through `claim_deliveries` (SECURITY DEFINER, `FOR UPDATE SKIP LOCKED`), which
/// rescues expired leases itself in the same statement, before claiming; everything else runs
/// in the delivery's organisation.
public struct OutboxQueue: WorkQueue {
    let database: Database
    /// Confines the queue to one organisation (tests); nil serves every organisation.
    let organisation: UUID?
    let circuit: CircuitRule
    /// The pool's send slots per endpoint: a claim takes no more rows of an endpoint than it has
    /// room for, and holds a slot for each it took.
    let slots: EndpointSlots
    /// Attempts that end while others are being recorded are recorded together.
    let completions: RequestBatcher<Completion, Bool>
    /// Deliveries given back while others are being given back go back together.
    let releases: RequestBatcher<Release, Bool>

    /// One ended attempt waiting to be recorded.
    struct Completion: Sendable {
        var claim: ClaimedDelivery
        var worker: String
        var startedAt: Date
        var record: DeliveryAttemptRecord
        var logger: Logger

        var recorded: RecordedAttempt {
            RecordedAttempt(
                claim: claim, startedAt: startedAt, result: record.result, answered: record.endpointAnswered?.endpoint,
                destination: record.destination)
        }
    }

    /// One claimed delivery given back unsent.
    struct Release: Sendable {
        var claim: ClaimedDelivery
        var worker: String
        var until: Date
    }

    public init(database: Database, organisation: UUID?, circuit: CircuitRule, slots: EndpointSlots) {
        self.database = database
        self.organisation = organisation
        self.circuit = circuit
        self.slots = slots
        completions = RequestBatcher(maximum: 256) { completions in
            await RequestBatcher.perOrganisation(completions, key: \.claim.organisationID) { organisation, completions in
                try await Self.record(completions, organisation: organisation, database: database, circuit: circuit)
            }
        }
        releases = RequestBatcher(maximum: 256) { releases in
            await RequestBatcher.perOrganisation(releases, key: \.claim.organisationID) { organisation, releases in
                try await database.withTenantRetryingConflicts(organisation) { tx in
                    try await perWorker(releases, worker: \.worker) { worker, mine in
                        try await tx.releaseDeliveries(mine.map { ($0.claim, $0.until) }, worker: worker)
                    }
                }
            }
        }
    }

    public var kind: String { "delivery" }

    /// A committed event that wrote deliveries.
    public func wakes(on message: BusMessage) -> Bool {
        guard case .eventCommitted(let organisationID, _, let work) = message, work.contains(.deliveries) else { return false }
        return organisation.map { $0 == organisationID } ?? true
    }

    /// Claims for each organisation with due work its share of `limit` (fair claiming, issue 12):
    /// an organisation with a million due rows takes no slot another organisation's single due
    /// row needs. A queue confined to one organisation claims from it alone. Each claim takes
    /// no more rows of an endpoint than the pool's slots have room for, and holds them.
    public func claim(worker: String, limit: Int, leaseSeconds: Int) async throws -> [ClaimedDelivery] {
        let due: [(organisation: UUID, due: Int)]
        if let organisation {
            due = [(organisation, limit)]
        } else {
            due = try await database.dueDeliveryOrganisations(limit: limit, room: slots.room)
        }
        var claimed: [ClaimedDelivery] = []
        for (organisation, share) in Self.shares(of: limit, among: due) {
            do {
                let mine = try await database.claimDeliveries(
                    worker: worker, limit: share, leaseSeconds: leaseSeconds, organisation: organisation, room: slots.room)
                slots.hold(mine)
                claimed += mine
            } catch  where !claimed.isEmpty {
                // What the organisations before it gave is leased to this worker and holds its
                // endpoints' slots: it is handled, and the error comes back with the next claim.
                break
            }
        }
        return claimed
    }

    /// A short claim means nothing more was due, or the endpoints' slots were full: both free
    /// up as sends end, so the runner waits for half of them before claiming again.
    public var pacesShortClaims: Bool { true }

    /// Splits `limit` slots among organisations with `due` rows each: from the one with the least
    /// up, each takes what it has due, at most an equal part of what is left. Every organisation
    /// listed gets at least one slot while slots remain; unused parts go to the larger ones.
    static func shares(of limit: Int, among due: [(organisation: UUID, due: Int)]) -> [(UUID, Int)] {
        var remaining = limit
        var result: [(UUID, Int)] = []
        // Stable: organisations with as much due keep the order given (the longest waiting first).
        let ordered = due.enumerated().sorted { ($0.element.due, $0.offset) < ($1.element.due, $1.offset) }.map(\.element)
        for (index, entry) in ordered.enumerated() where remaining > 0 {
            let left = ordered.count - index
            let share = min(entry.due, (remaining + left - 1) / left)
            if share > 0 { result.append((entry.organisation, share)) }
            remaining -= share
        }
        return result
    }

    public func heartbeat(worker: String, organisation: UUID, claims: [ClaimedDelivery], leaseSeconds: Int) async throws {
        _ = try await database.withTenant(organisation) { tx in
            try await tx.extendLeases(worker: worker, claims: claims, leaseSeconds: leaseSeconds)
        }
    }

    public func complete(
        _ claim: ClaimedDelivery, worker: String, startedAt: Date, outcome: DeliveryAttemptRecord, logger: Logger
    ) async throws -> Bool {
        try await completions.submit(Completion(claim: claim, worker: worker, startedAt: startedAt, record: outcome, logger: logger))
    }

    /// Records the attempts of one organisation finishing together: one fenced statement for all
    /// of them, then the endpoints' side effects of those recorded, in the order the attempts
    /// ended (a run of answers clears each breaker once); in one statement when the only effect
    /// is clearing breakers, else in one transaction.
    /// A deadlock or serialization failure runs it again: lost, the attempts' leases would
    /// expire and their messages go out a second time.
    static func record(_ completions: [Completion], organisation: UUID, database: Database, circuit: CircuitRule) async throws -> [Bool] {
        // Most batches only record attempts and clear the breakers of endpoints that answered:
        // one statement (migration 0039). A 410 Gone or an unanswered attempt needs the
        // transaction below, which applies each endpoint's effects in the order the attempts ended.
        if completions.allSatisfy({ $0.record.goneEndpoint == nil && $0.record.endpointAnswered?.answered != false }) {
            return try await perWorker(completions, worker: \.worker) { worker, mine in
                try await database.recordDeliveryAttempts(
                    mine.map(\.recorded),
                    organisation: organisation,
                    worker: worker)
            }
        }
        return try await database.withTenantRetryingConflicts(organisation) { tx in
            let recorded = try await perWorker(completions, worker: \.worker) { worker, mine in
                try await tx.completeDeliveries(mine.map(\.recorded), worker: worker)
            }
            var answered: Set<UUID> = []
            for (completion, was) in zip(completions, recorded) where was {
                let outcome = completion.record
                if let endpoint = outcome.goneEndpoint {
                    try await tx.recordEndpointAnswers(answered)
                    answered = []
                    try await tx.disableEndpoint(endpoint, reason: "The receiver answered 410 Gone on \(Date().formatted(.iso8601)).")
                }
                guard let answer = outcome.endpointAnswered else { continue }
                if answer.answered {
                    answered.insert(answer.endpoint)
                    continue
                }
                try await tx.recordEndpointAnswers(answered)
                answered = []
                if try await tx.recordEndpointNoAnswer(
                    answer.endpoint, threshold: circuit.failures, cooldown: circuit.cooldown,
                    reason: "\(circuit.failures) attempts in a row got no answer; the last: \(outcome.result.error ?? "no answer")")
                {
                    completion.logger.warning("endpoint circuit opened", metadata: ["endpoint_id": .string(answer.endpoint.lowercased)])
                }
            }
            try await tx.recordEndpointAnswers(answered)
            return recorded
        }
    }

    public func release(_ claim: ClaimedDelivery, worker: String, until: Date, reason: String) async throws -> Bool {
        let released = try await releases.submit(Release(claim: claim, worker: worker, until: until))
        Counter(label: "herald_delivery_released_total", dimensions: [("reason", reason)]).increment()
        return released
    }

    /// Nothing: the lease expires, and the next claim of its organisation (or the heartbeat's
    /// rescue) puts the row back and logs the attempt as EXPIRED (counted, so a delivery that always fails this way ends DEAD).
    public func fail(_ claim: ClaimedDelivery, worker: String, error: any Error) async throws {}

    /// Claims rescue the expired leases of the organisations they claim from; this rescues them
    /// everywhere (an organisation with nothing else due gets its stalled rows back too). A
    /// confined queue's claims rescue its organisation's.
    public func rescueExpired(worker: String) async throws -> Int {
        guard organisation == nil else { return 0 }
        return try await database.rescueExpiredDeliveries(worker: worker)
    }
}

/// Runs `body` once per worker name among `items`, with that worker's items, and puts its
/// answers back in the items' order. One queue's items all carry its runner's name; grouping
/// keeps the lease fence exact anyway.
private func perWorker<Item>(
    _ items: [Item], worker: (Item) -> String, _ body: (String, [Item]) async throws -> [Bool]
) async throws -> [Bool] {
    var answers = [Bool](repeating: false, count: items.count)
    for (name, positions) in Dictionary(grouping: items.indices, by: { worker(items[$0]) }) {
        let mine = try await body(name, positions.map { items[$0] })
        precondition(mine.count == positions.count, "one answer per item")
        for (position, answer) in zip(positions, mine) { answers[position] = answer }
    }
    return answers
}
