import Foundation
import HTTPTypes
import HeraldCore
import HeraldStore
import Hummingbird
import HummingbirdTesting
import PostgresNIO
import Testing

@testable import HeraldAPI

@Suite("Explain and dry run")
struct ExplainTests {
    let env: TestEnvironment

    init() async throws {
        env = try await TestEnvironment.shared
    }

    @Test("explain covers every reason code the engine can emit")
    func everyReasonCode() async throws {
        // setup: one organisation where each situation occurs once
        try await withCatalogue { org, catalogue, client in
            let users = try await org.store { tx in
                func user(_ name: String) async throws -> UUID {
                    try await tx.createUser(NewUser(email: "\(name)@x.example", displayName: name)).id
                }
                let (grouped, everyone, excluded, inactive, picky, muted, none, webhook, digest) =
                    (
                        try await user("grouped"), try await user("everyone"), try await user("excluded"), try await user("inactive"),
                        try await user("picky"), try await user("muted"), try await user("none"), try await user("webhook"),
                        try await user("digest")
                    )
                let group = try await tx.createGroup(key: "night-shift", name: "Night shift", description: "")
                try await tx.addGroupMember(group.id, grouped)
                _ = try await tx.setUserActive(inactive, false)
                func prefer(
                    _ user: UUID, _ channel: NotificationChannel, _ enabled: Bool, _ frequency: Frequency, _ conditions: [Condition] = []
                ) async throws {
                    try await tx.replacePreferences(
                        ofUser: user,
                        with: [
                            PreferenceCell(
                                categoryID: catalogue.activity, channel: channel,
                                setting: PreferenceSetting(enabled: enabled, frequency: frequency, conditions: conditions))
                        ])
                }
                try await prefer(
                    picky, .inApp, true, .immediate, [Condition(field: "title", op: .equals, value: .string("something else"))])
                try await prefer(muted, .inApp, false, .none)
                try await prefer(none, .inApp, true, .none)
                try await prefer(webhook, .webhook, true, .immediate)
                try await prefer(digest, .email, true, .daily)
                try await prefer(org.memberID, .email, true, .immediate)
                // The inactivity rule switched this one's email off (SWITCHED_OFF_INACTIVE).
                let dormant = try await user("dormant")
                _ = try await tx.switchOffEmail(of: dormant, now: Date())
                return (excluded, [grouped, everyone, excluded, inactive, picky, muted, none, webhook, digest, dormant])
            }
            var seen = Set<String>()
            // A throttle of one a minute: the second event throttles whoever the first one notified.
            _ = try await client.send(.patch, "/v1/organisation", token: org.ownerToken, json: #"{"throttle_per_minute": 1}"#)
            for _ in 0..<2 {
                let sent = try await client.send(
                    .post, "/v1/events", token: org.ownerToken,
                    json: """
                        {"type": "TASK_ASSIGNED", "payload": {"title": "Review"}, "audience": {"user_ids": ["\(org.memberID.uuidString)"], "roles": ["clinician"],
                         "groups": ["night-shift"], "everyone": true, "exclude_user_ids": ["\(users.0.uuidString)"]}}
                        """)
                #expect(sent.status == .accepted, "\(sent.text)")
                let id = try #require(sent.json["event_id"] as? String)
                var cursor: String?
                repeat {
                    let page = try await client.send(
                        .get, "/v1/events/\(id)/explain?limit=3" + (cursor.map { "&cursor=\($0)" } ?? ""), token: org.ownerToken)
                    #expect(page.status == .ok)
                    for user in page.json["items"] as? [[String: Any]] ?? [] {
                        seen.insert(user["reason"] as? String ?? "")
                        for channel in user["channels"] as? [[String: Any]] ?? [] { seen.insert(channel["reason"] as? String ?? "") }
                    }
                    cursor = page.json["next_cursor"] as? String
                } while cursor != nil
            }
            // check
            let expected = Set(ReasonCode.allCases.map(\.rawValue))
            #expect(expected.subtracting(seen).isEmpty, "never explained: \(expected.subtracting(seen).sorted())")
            #expect(seen.subtracting(expected).isEmpty, "unknown codes: \(seen.subtracting(expected).sorted())")
        }
    }

    /// Rows in every tenant table of the organisation.
    func rowCounts(_ org: TestOrganisation) async throws -> [String: Int] {
        var tables: [String] = []
        let rows = try await env.appClient.query(
            "SELECT relname FROM pg_class WHERE relnamespace = 'public'::regnamespace AND relkind = 'r' AND relname NOT IN ('schema_migrations', 'organisations')"
        )
        for try await name in rows.decode(String.self) { tables.append(name) }
        return try await env.appClient.withTransaction(logger: env.logger) { connection in
            try await connection.query("SELECT set_config('app.org_id', \(org.id.uuidString), true)", logger: env.logger)
            var counts: [String: Int] = [:]
            for table in tables {
                let result = try await connection.query("SELECT count(*)::int FROM \(unescaped: table)", logger: env.logger).collect()
                counts[table] = try result[0].decode(Int.self)
            }
            return counts
        }
    }

    @Test("a dry run shows the same decisions as notify and writes nothing")
    func dryRunWritesNothing() async throws {
        try await withCatalogue { org, _, client in
            let body = #"{"type": "ISQ_CRITICAL", "audience": {"roles": ["clinician"]}, "payload": {"isq": 25, "threshold": 55}}"#
            let before = try await rowCounts(org)
            let dry = try await client.send(.post, "/v1/events/dry-run", token: org.ownerToken, json: body)
            let after = try await rowCounts(org)
            #expect(dry.status == .ok, "\(dry.text)")
            #expect(before == after)
            #expect(dry.json["dry_run"] as? Bool == true)
            #expect(dry.json["event_id"] == nil)
            let sent = try await client.send(.post, "/v1/events", token: org.ownerToken, json: body)
            #expect(sent.json["counts"] as? [String: Int] == dry.json["counts"] as? [String: Int])
            let explained = try await client.send(
                .get, "/v1/events/\(try #require(sent.json["event_id"] as? String))/explain", token: org.ownerToken)
            func reasons(_ response: TestResponse) -> [String] {
                (response.json["items"] as? [[String: Any]] ?? []).sorted {
                    ($0["user_id"] as? String ?? "") < ($1["user_id"] as? String ?? "")
                }
                .flatMap { ($0["channels"] as? [[String: Any]] ?? []).compactMap { $0["reason"] as? String } }
            }
            #expect(reasons(dry) == reasons(explained))
            #expect(!reasons(dry).isEmpty)
            // A dry run pages like explain: one user per page here, every user once.
            var users: [String] = []
            var cursor: String?
            repeat {
                let page = try await client.send(
                    .post, "/v1/events/dry-run?limit=1" + (cursor.map { "&cursor=\($0)" } ?? ""), token: org.ownerToken, json: body)
                users += (page.json["items"] as? [[String: Any]] ?? []).compactMap { $0["user_id"] as? String }
                cursor = page.json["next_cursor"] as? String
            } while cursor != nil
            #expect(users.count == 2 && Set(users).count == 2)
        }
    }

    @Test("the debug form: the latest event of a type, or a dry run to everyone when there is none")
    func debugForm() async throws {
        try await withCatalogue { org, _, client in
            let none = try await client.send(.get, "/v1/notifications/debug?event=ISQ_CRITICAL", token: org.ownerToken)
            #expect(none.status == .ok, "\(none.text)")
            #expect(none.json["dry_run"] as? Bool == true)
            #expect((none.json["items"] as? [[String: Any]])?.allSatisfy { $0["rule"] as? String == "everyone" } == true)
            let sent = try await client.send(
                .post, "/v1/events", token: org.ownerToken,
                json: #"{"type": "ISQ_CRITICAL", "audience": {"user_ids": ["\#(org.memberID.uuidString)"]}}"#)
            let latest = try await client.send(
                .get, "/v1/notifications/debug?event=ISQ_CRITICAL&user_id=\(org.memberID.uuidString)", token: org.ownerToken)
            #expect(latest.json["dry_run"] as? Bool == false)
            #expect(latest.json["event_id"] as? String == sent.json["event_id"] as? String)
            #expect((latest.json["items"] as? [[String: Any]])?.count == 1)
            #expect(
                try await client.send(.get, "/v1/notifications/debug?event=NOPE", token: org.ownerToken).isProblem(.unprocessableContent))
        }
    }

    @Test("a broken template is a 422 that names the line; a good one renders in the recipient's locale")
    func templates() async throws {
        try await withCatalogue { org, catalogue, client in
            let broken = try await client.send(
                .put, "/v1/notification-types/\(catalogue.taskAssigned.uuidString)/templates/in_app/en", token: org.ownerToken,
                json: #"{"subject": "ok", "body": "Hello\n{{#items}}\n{{name}}"}"#)
            #expect(broken.isProblem(.unprocessableContent))
            #expect((broken.json["detail"] as? String)?.contains("line") == true, "\(broken.text)")
            _ = try await client.send(.patch, "/v1/users/\(org.memberID.uuidString)", token: org.ownerToken, json: #"{"locale": "fr-CA"}"#)
            _ = try await client.send(
                .post, "/v1/events", token: org.ownerToken,
                json:
                    #"{"type": "ISQ_CRITICAL", "audience": {"user_ids": ["\#(org.memberID.uuidString)"]}, "payload": {"isq": 30, "threshold": 55, "implant": "<IMP>"}}"#
            )
            let feed = try await client.send(.get, "/v1/me/notifications", token: org.memberToken)
            let item = try #require((feed.json["items"] as? [[String: Any]])?.first)
            #expect(item["title"] as? String == "ISQ critique 30")
            #expect((item["body"] as? String)?.contains("&lt;IMP&gt;") == true)
        }
    }
}
