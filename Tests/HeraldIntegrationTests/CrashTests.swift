import Foundation
import HeraldCore
import PostgresNIO
import Testing

@testable import HeraldStore

/// The published crash test: two `herald worker` processes deliver 10 000 webhooks; one is
/// killed with SIGKILL in the middle and started again. Every row ends SENT or DEAD, none is
/// lost, and a message the receiver saw twice carries the same `webhook-id` and body.
@Suite("Crash")
struct CrashTests {
    static let rows = 10_000

    @Test("SIGKILL in the middle of 10 000 deliveries: none lost, duplicates share their webhook-id")
    func sigkill() async throws {
        let env = try await TestEnvironment.shared
        let org = try await TestOrganisation.make()
        let catalogue = try await TestCatalogue.make(in: org)
        try await org.deliveryType("WARD_ALERT", category: catalogue.activity, channels: [.webhook])
        try await org.addUsers(Self.rows - 2)
        let hook = Peers.hook("crash")
        try await Peers.configure(hook.name, ["delay_ms": 2])
        _ = try await org.store { tx in
            try await tx.createEndpoint(
                channel: .webhook, format: .standard, name: "w", url: hook.url, eventTypes: [], secret: WebhookSecret.generate().string)
        }
        let (event, _) = try await org.notify(
            EventRequest(typeKey: "WARD_ALERT", audience: Audience(everyone: true), payload: .object([:])))
        #expect(try await org.deliveries(DeliveryFilter(eventID: event.id)).count == Self.rows)

        let first = try WorkerProcess(organisation: org.id, workerURL: env.workerURL)
        let second = try WorkerProcess(organisation: org.id, workerURL: env.workerURL)
        // Kill the first in the middle of the run.
        #expect(try await eventually(timeout: .seconds(120)) { (try await Peers.ids(hook.name)["total"] as? Int ?? 0) >= Self.rows / 4 })
        first.kill()
        let killedAt = try await Peers.ids(hook.name)["total"] as? Int ?? 0
        let restarted = try WorkerProcess(organisation: org.id, workerURL: env.workerURL)
        let deliveries = try await org.settled(timeout: .seconds(240))
        try await second.stop()
        try await restarted.stop()
        #expect(second.exitStatus == 0 && restarted.exitStatus == 0, "SIGTERM drains and exits cleanly")

        let statuses = Dictionary(grouping: deliveries, by: \.status).mapValues(\.count)
        #expect(deliveries.count == Self.rows)
        #expect(statuses[.sent, default: 0] + statuses[.dead, default: 0] == Self.rows, "\(statuses)")
        let ids = try await Peers.ids(hook.name)
        let unique = ids["unique"] as? Int ?? 0
        #expect(unique == statuses[.sent, default: 0], "every SENT row reached the receiver")
        #expect((ids["inconsistent"] as? [Any])?.isEmpty == true, "a duplicate carries the same webhook-id and body")
        #expect((ids["missing"] as? Int ?? 0) == 0)
        let rescued = try await org.store { tx in
            try await tx.connection.query("SELECT count(*)::int FROM delivery_attempts WHERE outcome = 'EXPIRED'", logger: tx.logger)
                .collect()[0].decode(Int.self)
        }
        print(
            "crash test: killed after \(killedAt) received; \(ids["total"] ?? 0) requests for \(unique) messages; \(rescued) leases rescued; \(statuses)"
        )
        #expect(rescued >= 1, "the killed worker's leases were rescued")
    }
}

/// `herald worker` as a separate process, confined to one organisation.
final class WorkerProcess: @unchecked Sendable {
    let process = Process()

    init(organisation: UUID, workerURL: String, metricsPort: Int? = nil, environment: [String: String] = [:]) throws {
        let env = ProcessInfo.processInfo.environment
        process.executableURL = URL(fileURLWithPath: env["HERALD_TEST_BINARY"] ?? ".build/debug/herald")
        process.arguments = ["worker"]
        process.environment = env.merging(
            [
                "DATABASE_WORKER_URL": workerURL,
                "HERALD_WORKER_ORGANISATION": organisation.uuidString,
                "HERALD_WORKERS": "16",
                "HERALD_WORKER_LEASE_SECONDS": "3",
                "HERALD_WORKER_POLL_MS": "200",
                "HERALD_RETRY_BASE_SECONDS": "0.5",
                "HERALD_DESTINATIONS_ALLOW": "127.0.0.1/32",
                "HERALD_SMTP_URL": Peers.smtpURL,
                "HERALD_LOG_LEVEL": "error",
                "HERALD_WORKER_METRICS_PORT": metricsPort.map(String.init) ?? "0",
            ].merging(environment) { _, new in new }
        ) { _, new in new }
        process.standardOutput = FileHandle.nullDevice
        try process.run()
    }

    func kill() {
        Glibc.kill(process.processIdentifier, SIGKILL)
        process.waitUntilExit()
    }

    /// SIGTERM, then wait: the pool drains what is in flight and exits.
    func stop() async throws {
        process.terminate()
        try await offPool { [process] in process.waitUntilExit() }
    }

    /// `stop` for a `defer`, which cannot wait asynchronously: SIGTERM, and the exit is left to
    /// the process (the test does not wait on a cooperative thread for its drain).
    func signal() {
        process.terminate()
    }

    var exitStatus: Int32 { process.terminationStatus }
}

/// The same for digests (issue 11): `herald worker` processes send 400 digests due in the same
/// slot; one is killed with SIGKILL in the middle and started again. Every member ends with one
/// run, every item is marked sent once, and a member who got the digest twice (killed between
/// the SMTP server's acceptance and the commit) got the same message under the same Message-ID.
@Suite("Crash: digests")
struct DigestCrashTests {
    static let members = 400

    @Test("SIGKILL in the middle of 400 digests: one run per member, every item sent once, duplicates share their Message-ID")
    func sigkill() async throws {
        let env = try await TestEnvironment.shared
        let org = try await TestOrganisation.make()
        let catalogue = try await TestCatalogue.make(in: org)
        try await org.addUsers(Self.members - 2)
        try await org.store { tx in
            try await tx.replacePreferenceDefaults(with: [
                PreferenceCell(
                    categoryID: catalogue.activity, channel: .email, setting: PreferenceSetting(enabled: true, frequency: .daily))
            ])
        }
        for index in 0..<3 {
            try await org.notify(
                EventRequest(
                    typeKey: "TASK_ASSIGNED", audience: Audience(everyone: true), payload: .object(["title": .string("Round \(index)")])))
        }
        // Their slot has come (the process runs on the real clock).
        let items = try await org.store { tx in
            try await tx.query(
                "UPDATE digest_items SET slot_at = now() - interval '1 minute' WHERE organisation_id = \(org.id) RETURNING id"
            ).count
        }
        #expect(items == Self.members * 3)
        let sentRuns = {
            try await org.store { tx in
                try await tx.query("SELECT count(*)::int FROM digest_runs WHERE organisation_id = \(org.id) AND status = 'SENT'")
                    .first!.decode(Int.self)
            }
        }

        let first = try WorkerProcess(organisation: org.id, workerURL: env.workerURL)
        let second = try WorkerProcess(organisation: org.id, workerURL: env.workerURL)
        #expect(try await eventually(timeout: .seconds(120)) { try await sentRuns() >= Self.members / 4 })
        first.kill()
        let killedAt = try await sentRuns()
        let restarted = try WorkerProcess(organisation: org.id, workerURL: env.workerURL)
        #expect(try await eventually(timeout: .seconds(240)) { try await sentRuns() == Self.members })
        try await second.stop()
        try await restarted.stop()
        #expect(second.exitStatus == 0 && restarted.exitStatus == 0, "SIGTERM drains and exits cleanly")

        let (runs, users, unsent) = try await org.store { tx in
            try await tx.query(
                """
                SELECT (SELECT count(*)::int FROM digest_runs WHERE organisation_id = \(org.id)),
                       (SELECT count(DISTINCT user_id)::int FROM digest_runs WHERE organisation_id = \(org.id)),
                       (SELECT count(*)::int FROM digest_items WHERE organisation_id = \(org.id) AND sent_at IS NULL)
                """
            ).first!.decode((Int, Int, Int).self)
        }
        #expect(runs == Self.members && users == Self.members && unsent == 0, "runs \(runs), users \(users), unsent \(unsent)")
        let addresses = try await org.store { tx in
            try await tx.query("SELECT email FROM users WHERE organisation_id = \(org.id)").map { try $0.decode(String.self) }
        }
        var duplicated = 0
        for address in addresses {
            let mails = try await Peers.mail(to: address).compactMap { $0["data"] as? String }
            #expect(!mails.isEmpty, "\(address) got no digest")
            let ids = Set(
                mails.map { raw in raw.split(separator: "\r\n").first { $0.lowercased().hasPrefix("message-id:") }.map(String.init) ?? "" })
            #expect(ids.count == 1, "\(address): \(mails.count) digests with Message-IDs \(ids)")
            let rounds = mails.first.map { raw in (0..<3).filter { raw.contains("Round \($0)") }.count } ?? 0
            #expect(rounds == 3, "\(address): every item in the digest")
            if mails.count > 1 { duplicated += 1 }
        }
        let rescued = try await org.store { tx in
            try await tx.query("SELECT count(*)::int FROM digest_runs WHERE organisation_id = \(org.id) AND attempts > 1").first!.decode(
                Int.self)
        }
        print(
            "digest crash test: killed after \(killedAt) digests recorded; \(rescued) runs retried after their lease expired; \(duplicated) members got theirs twice (same Message-ID)"
        )
    }
}
