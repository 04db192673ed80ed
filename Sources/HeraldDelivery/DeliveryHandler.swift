import Foundation
import HeraldCore
import HeraldStore
import Logging
import Metrics
import Synchronization

/// The send slots of each endpoint in one pool (issue 8, item 13): a claimed delivery of an
/// endpoint holds one from its claim until its send ends (until its attempt is recorded when the
/// receiver did not answer; until it is given back, or its handling ends another way). The claim asks the database for no more rows of an endpoint than it has
/// room for (`claim_deliveries`, migration 0059), so a full endpoint's rows stay due in the
/// database instead of being claimed, read and handed back.
public final class EndpointSlots: Sendable {
    /// Sends in flight at once to one endpoint in this pool.
    public let limit: Int
    private struct State {
        var held: [ClaimedDelivery: UUID] = [:]
        var counts: [UUID: Int] = [:]
    }
    private let state = Mutex(State())

    public init(limit: Int) {
        precondition(limit > 0)
        self.limit = limit
    }

    /// What a claim may take now: the room left of each endpoint holding slots.
    var room: EndpointRoom {
        EndpointRoom(limit: limit, busy: state.withLock { $0.counts.mapValues { limit - $0 } })
    }

    /// Takes a slot of each claim's endpoint (a claim without one takes none).
    func hold(_ claims: [ClaimedDelivery]) {
        state.withLock { state in
            for claim in claims {
                guard let endpoint = claim.endpointID, state.held.updateValue(endpoint, forKey: claim) == nil else { continue }
                state.counts[endpoint, default: 0] += 1
            }
        }
    }

    /// Leaves the slot `claim` holds; a second call does nothing.
    func leave(_ claim: ClaimedDelivery) {
        state.withLock { state in
            guard let endpoint = state.held.removeValue(forKey: claim) else { return }
            state.counts[endpoint, default: 1] -= 1
            if state.counts[endpoint] == 0 { state.counts[endpoint] = nil }
        }
    }
}

/// Sends one claimed delivery: reads it in its organisation, checks its endpoint's circuit (or
/// gives it back while it is open), sends, and says how the attempt ended. The runner records
/// that through `OutboxQueue`. Its endpoint's send slot was taken at the claim (`EndpointSlots`).
public final class DeliveryHandler: WorkHandler, Sendable {
    let database: Database
    let sender: DeliverySender
    /// The pool's send slots per endpoint, shared with its `OutboxQueue`.
    let slots: EndpointSlots
    /// How long a delivery given back for a busy circuit trial waits.
    let endpointBusyDelay: TimeInterval
    let circuitCooldown: TimeInterval
    let retry: RetryPolicy
    /// Reads what the deliveries starting together need in one transaction per organisation.
    private let works: RequestBatcher<ClaimedDelivery, DeliveryWork?>

    public init(
        database: Database, sender: DeliverySender, slots: EndpointSlots, endpointBusyDelay: TimeInterval,
        circuitCooldown: TimeInterval, retry: RetryPolicy
    ) {
        self.database = database
        self.sender = sender
        self.slots = slots
        self.endpointBusyDelay = endpointBusyDelay
        self.circuitCooldown = circuitCooldown
        self.retry = retry
        works = RequestBatcher(maximum: 256) { claims in
            await RequestBatcher.perOrganisation(claims, key: \.organisationID) { organisation, claims in
                let works = try await database.withTenant(organisation) { tx in try await tx.deliveryWorks(claims.map(\.deliveryID)) }
                return claims.map { works[$0.deliveryID] }
            }
        }
    }

    public func handle(_ claim: ClaimedDelivery, logger: Logger) async throws -> WorkDisposition<DeliveryAttemptRecord> {
        // The slot is left when the send ends, before the attempt is recorded: the slots bound
        // the sends to a receiver. A send the receiver did not answer keeps it until its attempt
        // is recorded (`finished`), which may open the endpoint's circuit: the slot's next claim
        // then sees it open, instead of sending another wave into the silence (a trial: 16
        // timed-out sends with 8 slots, where 5 in a row open the circuit).
        var keepUntilRecorded = false
        defer { if !keepUntilRecorded { slots.leave(claim) } }
        guard let work = try await works.submit(claim) else { throw StoreError.notFound("delivery") }
        let outcome: SendOutcome
        if let stop = sender.stop(work, now: Date()) {
            outcome = stop
        } else {
            if let endpoint = work.endpoint, let (until, why) = try await admit(endpoint, claim, now: Date()) {
                return .giveBack(until: until, reason: why)
            }
            outcome = await sender.deliver(work)
        }
        // The mail server's circuit is open (`RelayCircuit`): back, unattempted, until it may be tried.
        if case .paused(let until, let why) = outcome { return .giveBack(until: until, reason: why) }
        keepUntilRecorded = outcome.receiverAnswered == false
        if case .deferred(let why) = outcome {
            return .giveBack(until: Date().addingTimeInterval(endpointBusyDelay), reason: why)
        }
        let result = outcome.result(attempt: claim.attempt, maxAttempts: work.delivery.maxAttempts, policy: retry, now: Date())
        var record = DeliveryAttemptRecord(channel: work.delivery.channel, result: result)
        if case .gone = outcome, let endpoint = work.endpoint { record.goneEndpoint = endpoint.id }
        if let endpoint = work.endpoint, endpoint.enabled, let answered = outcome.receiverAnswered {
            record.endpointAnswered = (endpoint.id, answered)
            if endpoint.url != work.delivery.destination { record.destination = endpoint.url }
        }
        return .done(record)
    }

    /// Leaves the endpoint's slot if the handling did not, counts and logs the attempt.
    public func finished(
        _ claim: ClaimedDelivery, disposition: WorkDisposition<DeliveryAttemptRecord>?, recorded: Bool?,
        duration: Duration, logger: Logger
    ) {
        slots.leave(claim)
        guard case .done(let record)? = disposition, let recorded else { return }
        let result = record.result
        let outcome = (recorded ? result.outcome : .fenced).rawValue
        let seconds = Double(duration.components.seconds) + Double(duration.components.attoseconds) / 1e18
        Counter(label: "herald_delivery_attempts_total", dimensions: [("channel", record.channel.rawValue), ("outcome", outcome)])
            .increment()
        Timer(label: "herald_delivery_attempt_seconds", dimensions: [("channel", record.channel.rawValue)]).recordSeconds(seconds)
        logger.info(
            "delivery attempt",
            metadata: [
                "channel": .string(record.channel.rawValue), "outcome": .string(outcome),
                "duration_ms": "\(Int(seconds * 1000))", "response_code": "\(result.responseCode.map(String.init) ?? "-")",
                "error": .string(result.error ?? ""),
            ])
    }

    /// Says until when to give the delivery back while `endpoint`'s circuit is open or another
    /// worker runs its half-open trial; nil to send. (A claim takes no row of an endpoint whose
    /// circuit is open, and one of a half-open one; another pool may have opened it since.)
    private func admit(_ endpoint: Endpoint, _ claim: ClaimedDelivery, now: Date) async throws -> (until: Date, why: String)? {
        let state = endpoint.circuit.state(at: now)
        if state == .open, let retryAt = endpoint.circuit.retryAt {
            return (retryAt, "circuit open")
        }
        // A half-open circuit lets one trial through per cool-down: taking it (takeCircuitTrial)
        // moves the cool-down's end on in the database.
        if state == .halfOpen {
            let trial = try await database.withTenant(claim.organisationID) { tx in
                try await tx.takeCircuitTrial(endpoint.id, cooldown: circuitCooldown)
            }
            if !trial { return (now.addingTimeInterval(endpointBusyDelay + Double.random(in: 0..<1)), "circuit trial running") }
        }
        return nil
    }
}
