import HeraldStore
import Logging
import Metrics
import ServiceLifecycle

/// Reads the outbox's backlog into gauges every `interval` (docs/operations.md, "Metrics"):
/// `herald_outbox_due`, `herald_outbox_waiting`, `herald_outbox_sending` and
/// `herald_outbox_oldest_due_seconds`, per queue and channel, across organisations. A series
/// whose rows are gone reads 0, not its last value. A failed read is logged and tried again at the
/// next interval; the gauges keep their last values meanwhile.
public struct BacklogProbe: Service {
    /// The queues and channels a gauge is kept for, every one from the first read.
    static let series = [("deliveries", "email"), ("deliveries", "webhook"), ("deliveries", "chat"), ("digests", "email")]

    let database: Database
    let interval: Duration
    let logger: Logger

    public init(database: Database, interval: Duration, logger: Logger) {
        self.database = database
        self.interval = interval
        self.logger = logger
    }

    public func run() async throws {
        await cancelWhenGracefulShutdown {
            while !Task.isCancelled {
                do {
                    Self.record(try await database.outboxBacklog())
                } catch {
                    logger.warning("outbox backlog not read", metadata: ["error": "\(String(reflecting: error))"])
                }
                try? await Task.sleep(for: interval)
            }
        }
    }

    /// Sets every series from `figures`; those absent read 0.
    static func record(_ figures: [BacklogFigure]) {
        for (queue, channel) in series {
            let figure = figures.first { $0.queue == queue && $0.channel == channel }
            let labels = [("queue", queue), ("channel", channel)]
            Gauge(label: "herald_outbox_due", dimensions: labels).record(figure?.due ?? 0)
            Gauge(label: "herald_outbox_waiting", dimensions: labels).record(figure?.waiting ?? 0)
            Gauge(label: "herald_outbox_sending", dimensions: labels).record(figure?.sending ?? 0)
            Gauge(label: "herald_outbox_oldest_due_seconds", dimensions: labels).record(figure?.oldestDueSeconds ?? 0)
        }
    }
}
