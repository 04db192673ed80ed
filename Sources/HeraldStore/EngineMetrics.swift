import HeraldCore
import Metrics

/// What the engine accepted and decided, counted for Prometheus once it is written
/// (docs/operations.md, "Metrics"): the events, and per channel of each recipient what was made
/// or why nothing was. Counted per event and per fan-out chunk, never per recipient.
public enum EngineMetrics {
    /// Where an event came from.
    public enum Source: String, Sendable, CaseIterable {
        /// `POST /v1/events`.
        case notify
        /// A schedule's occurrence, or `POST /v1/schedules/{id}/run`.
        case schedule
    }

    /// The outcomes of `herald_decisions_total`, as `DecisionCounts` names them.
    public static let outcomes = ["in_app", "immediate", "digest", "skipped"]

    /// An event written for the first time (a replay of an idempotency key is not counted), with
    /// what was decided for the recipients written with it (none yet for a fan-out).
    public static func accepted(_ source: Source, counts: DecisionCounts) {
        Counter(label: "herald_events_total", dimensions: [("source", source.rawValue)]).increment()
        decided(counts)
    }

    /// What was decided for recipients just written: an event's, or a fan-out chunk's.
    public static func decided(_ counts: DecisionCounts) {
        for (outcome, count) in zip(outcomes, [counts.inApp, counts.immediate, counts.digest, counts.skipped]) where count > 0 {
            Counter(label: "herald_decisions_total", dimensions: [("outcome", outcome)]).increment(by: Int64(count))
        }
        if counts.throttled > 0 { Counter(label: "herald_decisions_throttled_total").increment(by: Int64(counts.throttled)) }
        if counts.held > 0 { Counter(label: "herald_decisions_held_total").increment(by: Int64(counts.held)) }
    }

    /// Every series above at zero (`MetricsAtZero`).
    public static func register() {
        for source in Source.allCases { _ = Counter(label: "herald_events_total", dimensions: [("source", source.rawValue)]) }
        for outcome in outcomes { _ = Counter(label: "herald_decisions_total", dimensions: [("outcome", outcome)]) }
        _ = Counter(label: "herald_decisions_throttled_total")
        _ = Counter(label: "herald_decisions_held_total")
    }
}
