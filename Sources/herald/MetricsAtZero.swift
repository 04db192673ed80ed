import HeraldCore
import HeraldStore
import Metrics

/// Registers Herald's counters of fixed labels at zero when a process starts, so `/metrics` shows
/// every series an alert may name from the first scrape: a counter appears only when it is first
/// touched, and `rate(herald_delivery_attempts_total{outcome="DEAD"}[5m])` over a series that
/// does not exist yet is no alert at all. Counters whose labels are free text (a release's
/// reason) appear with their first value.
enum MetricsAtZero {
    static func register() {
        for name in [
            "herald_stream_events_total", "herald_stream_resyncs_total", "herald_stream_drops_total", "herald_stream_refusals_total",
            "herald_stream_sweeps_total", "herald_organisation_gate_waits_total", "herald_organisation_gate_refusals_total",
            "herald_feed_cache_hits_total", "herald_feed_cache_misses_total", "herald_notification_bus_overflows_total",
            "herald_notification_bus_reconnects_total", "herald_fanout_chunks_total",
        ] {
            _ = Counter(label: name)
        }
        for channel in NotificationChannel.allCases where channel != .inApp {
            for outcome in AttemptOutcome.allCases {
                _ = Counter(
                    label: "herald_delivery_attempts_total", dimensions: [("channel", channel.rawValue), ("outcome", outcome.rawValue)])
            }
        }
        for kind in ["delivery", "digest", "fanout", "job", "schedule"] {
            _ = Counter(label: "herald_\(kind)_abandoned_total")
        }
        for outcome in ["sent", "empty", "failed"] {
            _ = Counter(label: "herald_digests_total", dimensions: [("outcome", outcome)])
        }
        for job in SystemJob.allCases {
            for outcome in ["succeeded", "failed"] {
                _ = Counter(label: "herald_job_runs_total", dimensions: [("job", job.rawValue), ("outcome", outcome)])
            }
        }
        for outcome in ["finished", "cancelled", "failed", "failed_chunk"] {
            _ = Counter(label: "herald_fanouts_total", dimensions: [("outcome", outcome)])
        }
        EngineMetrics.register()
        for outcome in ["sent", "replayed", "failed"] {
            _ = Counter(label: "herald_schedule_occurrences_total", dimensions: [("outcome", outcome)])
        }
    }
}
