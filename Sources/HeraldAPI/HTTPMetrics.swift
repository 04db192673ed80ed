import Foundation
import HeraldStore
import Prometheus

/// Request counts and latencies, exposed on `/metrics`.
public struct HTTPMetrics: Sendable {
    /// The registry `/metrics` renders.
    public let registry: PrometheusCollectorRegistry

    public init(registry: PrometheusCollectorRegistry = PrometheusCollectorRegistry()) {
        self.registry = registry
    }

    static var requests: MetricNameDescriptor {
        MetricNameDescriptor(
            namespace: "herald", subsystem: "http", metricName: "requests", unitName: "total",
            helpText: "HTTP requests by method, route and status.")
    }
    static var latency: MetricNameDescriptor {
        MetricNameDescriptor(
            namespace: "herald", subsystem: "http", metricName: "request_duration", unitName: "seconds",
            helpText: "HTTP request latency by method and route.")
    }
    static let buckets: [Duration] = [
        .milliseconds(5), .milliseconds(10), .milliseconds(25), .milliseconds(50), .milliseconds(100),
        .milliseconds(250), .milliseconds(500), .seconds(1), .seconds(2.5), .seconds(5),
    ]

    func record(method: String, route: String, status: Int, duration: Duration) {
        registry.makeCounter(descriptor: Self.requests, labels: [("method", method), ("route", route), ("status", String(status))])
            .increment()
        registry.makeDurationHistogram(descriptor: Self.latency, labels: [("method", method), ("route", route)], buckets: Self.buckets)
            .recordNanoseconds(duration.nanoseconds)
    }

    /// The exposition text (`/metrics` of `herald serve` and of `herald worker`).
    public func render() -> String {
        var buffer: [UInt8] = []
        registry.emit(into: &buffer)
        return String(decoding: buffer, as: UTF8.self)
    }
}
