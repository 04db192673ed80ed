import AsyncHTTPClient
import Foundation
import HeraldCore
import NIOCore
import Testing

@testable import HeraldStore

/// `herald worker` as operators run it, a process of its own: with `HERALD_WORKER_METRICS_PORT`
/// it serves the metrics its workers record on `/metrics` (and `/healthz`), as `herald serve`
/// does for the workers inside it.
@Suite("Worker metrics")
struct WorkerMetricsTests {
    @Test("a separate worker serves its delivery metrics on its own port")
    func servesMetrics() async throws {
        let env = try await TestEnvironment.shared
        let org = try await TestOrganisation.make()
        let catalogue = try await TestCatalogue.make(in: org)
        try await org.deliveryType("WARD_ALERT", category: catalogue.activity, channels: [.webhook])
        let hook = Peers.hook("worker-metrics")
        _ = try await org.store { tx in
            try await tx.createEndpoint(
                channel: .webhook, format: .standard, name: "w", url: hook.url, eventTypes: [], secret: WebhookSecret.generate().string)
        }
        let port = Int.random(in: 20_000..<30_000)
        let worker = try WorkerProcess(organisation: org.id, workerURL: env.workerURL, metricsPort: port)
        defer { worker.signal() }
        _ = try await org.notify(EventRequest(typeKey: "WARD_ALERT", audience: Audience(userIDs: [org.memberID]), payload: .object([:])))
        _ = try await org.settled(timeout: .seconds(60))
        // The attempt is counted once it is recorded; the scrape may come just before.
        var text = ""
        #expect(
            try await eventually(timeout: .seconds(20)) {
                text = (try? await Self.get("http://127.0.0.1:\(port)/metrics")) ?? ""
                return text.split(separator: "\n").contains(#"herald_delivery_attempts_total{channel="webhook",outcome="SENT"} 1"#)
            }, "\(text.prefix(2000))")
        #expect(try await Self.get("http://127.0.0.1:\(port)/healthz") == #"{"status":"ok"}"#)
    }

    static func get(_ url: String) async throws -> String {
        let response = try await HTTPClient.shared.execute(HTTPClientRequest(url: url), timeout: .seconds(5))
        return String(buffer: try await response.body.collect(upTo: 1 << 20))
    }
}
