import AsyncHTTPClient
import Foundation
import HeraldCore
import NIOCore
import NIOHTTP1
import PostgresNIO
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

    @Test("serve counts the events it accepts and what the engine decided; a worker reads the outbox's backlog into gauges")
    func engineCountersAndBacklog() async throws {
        let env = try await TestEnvironment.shared
        let org = try await TestOrganisation.make()
        let catalogue = try await TestCatalogue.make(in: org)
        try await org.deliveryType("NIGHT_ROUND", category: catalogue.activity, channels: [.inApp, .email])
        // The member's quiet hours run from an hour ago to an hour ahead (UTC): their email is held.
        var calendar = Calendar(identifier: .gregorian)
        calendar.timeZone = .gmt
        func clock(_ date: Date) -> String {
            let parts = calendar.dateComponents([.hour, .minute], from: date)
            return String(format: "%02d:%02d", parts.hour ?? 0, parts.minute ?? 0)
        }
        let now = Date()
        let window = try #require(QuietHours(start: clock(now - 3600), end: clock(now + 3600)))
        try await org.store { tx in
            _ = try await tx.updateUser(org.memberID, UserChange(timezone: .some("UTC"), quietHours: .some(window)))
            _ = try await tx.updateUser(org.ownerID, UserChange(timezone: .some("UTC")))
        }
        let server = try await StreamServeProcess.start(keys: try StreamServeProcess.keysDirectory())
        defer { server.kill() }
        let token = try await server.login("owner@\(org.slug).example", of: org)
        let event = #"{"type": "NIGHT_ROUND", "audience": {"user_ids": ["\#(org.memberID.lowercased)", "\#(org.ownerID.lowercased)"]}}"#
        let sent = try await server.send(.POST, "/v1/events", token: token, json: event)
        #expect(sent.status == 202, "\(sent.text)")
        // A replay of the same key is not a second event.
        for _ in 0..<2 {
            var request = HTTPClientRequest(url: server.url + "/v1/events")
            request.method = .POST
            request.headers.add(name: "Authorization", value: "Bearer \(token)")
            request.headers.add(name: "Content-Type", value: "application/json")
            request.headers.add(name: "Idempotency-Key", value: "night-1")
            request.body = .bytes(ByteBuffer(string: event))
            #expect(try await HTTPClient.shared.execute(request, timeout: .seconds(30)).status == .accepted)
        }
        // Two events: four in-app rows, four emails of which two held, eight channels skipped; nothing throttled.
        let lines = Set(try await Self.get(server.url + "/metrics").split(separator: "\n").map(String.init))
        for line in [
            #"herald_events_total{source="notify"} 2"#, #"herald_events_total{source="schedule"} 0"#,
            #"herald_decisions_total{outcome="in_app"} 4"#, #"herald_decisions_total{outcome="immediate"} 4"#,
            #"herald_decisions_total{outcome="digest"} 0"#, #"herald_decisions_total{outcome="skipped"} 8"#,
            "herald_decisions_held_total 2", "herald_decisions_throttled_total 0",
        ] {
            #expect(lines.contains(line), "\(line)")
        }
        // The held emails wait, counted by a worker with any other organisation's waiting rows (the gauges count them all).
        let port = Int.random(in: 20_000..<30_000)
        let worker = try WorkerProcess(
            organisation: org.id, workerURL: env.workerURL, metricsPort: port, environment: ["HERALD_BACKLOG_SECONDS": "1"])
        defer { worker.signal() }
        var text = ""
        #expect(
            try await eventually(timeout: .seconds(30)) {
                text = (try? await Self.get("http://127.0.0.1:\(port)/metrics")) ?? ""
                return (Self.gauge(text, "herald_outbox_waiting", channel: "email") ?? 0) >= 2
            }, "\(text.prefix(4000))")
        for name in ["herald_outbox_due", "herald_outbox_sending", "herald_outbox_oldest_due_seconds"] {
            for (queue, channel) in [("deliveries", "webhook"), ("deliveries", "chat"), ("digests", "email")] {
                #expect(Self.gauge(text, name, queue: queue, channel: channel) != nil, "\(name) \(queue) \(channel)")
            }
        }
    }

    @Test("the backlog's figures per queue and channel: due, waiting, sending, the oldest due row; the worker role's alone")
    func backlogFigures() async throws {
        let env = try await TestEnvironment.shared
        // A database of its own: the figures are totals across every organisation.
        try await env.withScratchDatabase("backlog") { app, worker, _ in
            #expect(try await worker.outboxBacklog().map(\.queue) == ["digests"])
            let org = try await app.emailOutbox("backlog", users: 5, events: 2)
            // Of ten emails due now: two wait for a retry, one is being sent, one has waited an hour.
            try await app.withTenant(org) { tx in
                let ids = try await tx.query("SELECT id FROM deliveries WHERE organisation_id = \(org) ORDER BY id").map {
                    try $0.decode(UUID.self)
                }
                try await tx.query(
                    """
                    UPDATE deliveries SET status = 'FAILED', next_attempt_at = now() + interval '10 minutes'
                    WHERE organisation_id = \(org) AND id = ANY(\(Array(ids[0...1])))
                    """)
                try await tx.query(
                    """
                    UPDATE deliveries SET status = 'SENDING', lease_owner = 'test', lease_expires_at = now() + interval '1 minute'
                    WHERE organisation_id = \(org) AND id = \(ids[2])
                    """)
                try await tx.query(
                    "UPDATE deliveries SET next_attempt_at = now() - interval '1 hour' WHERE organisation_id = \(org) AND id = \(ids[3])")
            }
            let figures = try await worker.outboxBacklog()
            let email = try #require(figures.first { $0.queue == "deliveries" && $0.channel == "email" })
            #expect((email.due, email.waiting, email.sending) == (7, 2, 1))
            #expect((3_600..<3_700).contains(email.oldestDueSeconds))
            #expect(figures.count == 2)
            let digests = try #require(figures.first { $0.queue == "digests" })
            #expect((digests.due, digests.waiting, digests.sending, digests.oldestDueSeconds) == (0, 0, 0, 0))
            // The application role may not read the totals of every organisation.
            await #expect(throws: PSQLError.self) { try await app.outboxBacklog() }
        }
    }

    /// A gauge's value on a scrape, whatever the order of its labels.
    static func gauge(_ text: String, _ name: String, queue: String = "deliveries", channel: String) -> Double? {
        for line in text.split(separator: "\n") where line.hasPrefix(name + "{") {
            guard line.contains(#"queue="\#(queue)""#), line.contains(#"channel="\#(channel)""#),
                let value = line.split(separator: " ").last
            else { continue }
            return Double(value)
        }
        return nil
    }

    static func get(_ url: String) async throws -> String {
        let response = try await HTTPClient.shared.execute(HTTPClientRequest(url: url), timeout: .seconds(5))
        return String(buffer: try await response.body.collect(upTo: 1 << 20))
    }
}
