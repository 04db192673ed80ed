import Foundation
import HTTPTypes
import HeraldCore
import Hummingbird
import HummingbirdTesting
import PostgresNIO
import Testing

@testable import HeraldAPI
@testable import HeraldStore

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
                // Webhooks on by the organisation's default (a user's own cell does not apply), with
                // no endpoint to go to (NO_DESTINATION).
                try await tx.replacePreferenceDefaults(with: [
                    PreferenceCell(
                        categoryID: catalogue.activity, channel: .webhook, setting: PreferenceSetting(enabled: true, frequency: .immediate))
                ])
                _ = webhook
                try await prefer(digest, .email, true, .daily)
                try await prefer(org.memberID, .email, true, .immediate)
                // The inactivity rule switched this one's email off (SWITCHED_OFF_INACTIVE).
                let dormant = try await user("dormant")
                _ = try await tx.switchOffEmail(of: dormant, now: Date())
                // Quiet hours from an hour ago to an hour from now, in UTC (HELD_QUIET_HOURS).
                let minute = Int(Date().timeIntervalSince1970 / 60) % 1440
                let sleeper = try await tx.createUser(
                    NewUser(
                        email: "sleeper@x.example", displayName: "sleeper", timezone: "UTC",
                        quietHours: QuietHours(start: (minute + 1380) % 1440, end: (minute + 60) % 1440))
                ).id
                try await prefer(sleeper, .email, true, .immediate)
                return (excluded, [grouped, everyone, excluded, inactive, picky, muted, none, webhook, digest, dormant, sleeper])
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
                let id = try sent.decoded(Components.Schemas.EventAccepted.self).eventId
                var cursor: String?
                repeat {
                    let page = try await client.send(
                        .get, "/v1/events/\(id)/explain?limit=3" + (cursor.map { "&cursor=\($0)" } ?? ""), token: org.ownerToken)
                    #expect(page.status == .ok)
                    let explanation = try page.decoded(Components.Schemas.Explanation.self)
                    for user in explanation.items {
                        seen.insert(user.reason)
                        for channel in user.channels { seen.insert(channel.reason) }
                    }
                    cursor = explanation.nextCursor
                } while cursor != nil
            }
            // An event for the sleeper that expires before their quiet hours end (the throttle off,
            // which the two above used up): its email is not queued (EXPIRES_IN_QUIET_HOURS).
            _ = try await client.send(.patch, "/v1/organisation", token: org.ownerToken, json: #"{"throttle_per_minute": 0}"#)
            let sleeper = try #require(users.1.last)
            let soon = RFC3339.wholeSeconds(Date().addingTimeInterval(1800))
            let expiring = try await client.send(
                .post, "/v1/events", token: org.ownerToken,
                json: """
                    {"type": "TASK_ASSIGNED", "payload": {"title": "Today only"}, "expires_at": "\(soon)",
                     "audience": {"user_ids": ["\(sleeper.uuidString)"]}}
                    """)
            #expect(expiring.status == .accepted, "\(expiring.text)")
            let expiringID = try expiring.decoded(Components.Schemas.EventAccepted.self).eventId
            let explained = try await client.send(.get, "/v1/events/\(expiringID)/explain", token: org.ownerToken)
            for user in try explained.decoded(Components.Schemas.Explanation.self).items {
                for channel in user.channels { seen.insert(channel.reason) }
            }
            // check
            let expected = Set(ReasonCode.allCases.map(\.rawValue))
            #expect(expected.subtracting(seen).isEmpty, "never explained: \(expected.subtracting(seen).sorted())")
            #expect(seen.subtracting(expected).isEmpty, "unknown codes: \(seen.subtracting(expected).sorted())")
        }
    }

    @Test("recipients decided alike share one decision set, and explain still names each one's own rows (0028)")
    func sharedDecisionsKeepOwnRows() async throws {
        let org = try await TestOrganisation.make()
        _ = try await TestCatalogue.make(in: org)
        let users =
            [org.ownerID, org.memberID]
            + (try await org.store { tx in
                try await (0..<3).asyncMap { i in try await tx.createUser(NewUser(email: "d\(i)@x.example", displayName: "D\(i)")).id }
            })
        let (event, plan) = try await org.notify(
            EventRequest(typeKey: "TASK_ASSIGNED", audience: Audience(userIDs: users), payload: .object(["title": .string("ids")])))
        let (explained, sets) = try await org.store { tx in
            (
                try await tx.explain(eventID: event.id, userID: nil, limit: 10, after: nil).items,
                try await tx.query(
                    "SELECT count(*)::int FROM event_decisions WHERE organisation_id = \(org.id) AND event_id = \(event.id)")[0]
                    .decode(Int.self)
            )
        }
        let planned = Dictionary(uniqueKeysWithValues: plan.traces.map { ($0.targeting.userID, $0.channels.map(TraceChannelRecord.init)) })
        #expect(explained.count == users.count)
        for recipient in explained {
            #expect(recipient.channels == planned[recipient.userID], "\(recipient.userID)")
            #expect(recipient.channels.contains { $0.notificationID != nil || !$0.deliveryIDs.isEmpty })
        }
        let distinct = Set(plan.traces.map { $0.channels.map(SharedChannelDecision.init) }).count
        #expect(sets == distinct)
        #expect(distinct < users.count, "the three new users were decided alike")
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

    @Test("a condition not met is named: its index and the condition in words, in explain and in a dry run")
    func failedConditionNamed() async throws {
        try await withCatalogue { org, catalogue, client in
            try await org.store { tx in
                try await tx.replacePreferences(
                    ofUser: org.memberID,
                    with: [
                        PreferenceCell(
                            categoryID: catalogue.activity, channel: .inApp,
                            setting: PreferenceSetting(
                                enabled: true, frequency: .immediate,
                                conditions: [
                                    Condition(field: "title", op: .in, values: [.string("Review"), .string("Sign")]),
                                    Condition(field: "payload.points", op: .atLeast, value: .number(5)),
                                ]))
                    ])
            }
            func inApp(_ response: TestResponse) throws -> Components.Schemas.ExplainedChannel {
                let explanation = try response.decoded(Components.Schemas.Explanation.self)
                let user = try #require(explanation.items.first { $0.userId == org.memberID.uuidString.lowercased() })
                return try #require(user.channels.first { $0.channel == .inApp })
            }
            let body =
                #"{"type": "TASK_ASSIGNED", "payload": {"title": "Review", "points": 3}, "audience": {"user_ids": ["\#(org.memberID)"]}}"#
            let sent = try await client.send(.post, "/v1/events", token: org.ownerToken, json: body)
            #expect(sent.status == .accepted, "\(sent.text)")
            let id = try sent.decoded(Components.Schemas.EventAccepted.self).eventId
            let explained = try inApp(try await client.send(.get, "/v1/events/\(id)/explain", token: org.ownerToken))
            let dry = try inApp(try await client.send(.post, "/v1/events/dry-run", token: org.ownerToken, json: body))
            for channel in [explained, dry] {
                #expect(channel.reason == "CONDITION_NOT_MET")
                #expect(channel.failedCondition == 1)
                #expect(
                    channel.reasonText
                        == "Condition 2 of 2 of the preference, payload.points gte 5, is not met by the event or its recipient.")
            }
            // The first condition failing instead, and a channel decided otherwise: no index.
            let other =
                #"{"type": "TASK_ASSIGNED", "payload": {"title": "File", "points": 9}, "audience": {"user_ids": ["\#(org.memberID)"]}}"#
            let first = try inApp(try await client.send(.post, "/v1/events/dry-run", token: org.ownerToken, json: other))
            #expect(first.failedCondition == 0)
            #expect(first.reasonText.contains(#"title in ["Review","Sign"]"#), "\(first.reasonText)")
            let met =
                #"{"type": "TASK_ASSIGNED", "payload": {"title": "Sign", "points": 9}, "audience": {"user_ids": ["\#(org.memberID)"]}}"#
            let created = try inApp(try await client.send(.post, "/v1/events/dry-run", token: org.ownerToken, json: met))
            #expect(created.reason == "IN_APP_CREATED")
            #expect(created.failedCondition == nil)
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
            let dryRun = try dry.decoded(Components.Schemas.Explanation.self)
            #expect(dryRun.dryRun == true)
            #expect(dryRun.eventId == nil)
            let sent = try await client.send(.post, "/v1/events", token: org.ownerToken, json: body)
            let accepted = try sent.decoded(Components.Schemas.EventAccepted.self)
            #expect(accepted.counts == dryRun.counts)
            let explained = try await client.send(.get, "/v1/events/\(accepted.eventId)/explain", token: org.ownerToken)
            func reasons(_ response: TestResponse) throws -> [String] {
                try response.decoded(Components.Schemas.Explanation.self).items.sorted { $0.userId < $1.userId }
                    .flatMap { $0.channels.map(\.reason) }
            }
            #expect(try reasons(dry) == reasons(explained))
            #expect(try !reasons(dry).isEmpty)
            // A dry run pages like explain: one user per page here, every user once.
            var users: [String] = []
            var cursor: String?
            repeat {
                let page = try await client.send(
                    .post, "/v1/events/dry-run?limit=1" + (cursor.map { "&cursor=\($0)" } ?? ""), token: org.ownerToken, json: body)
                let explanation = try page.decoded(Components.Schemas.Explanation.self)
                users += explanation.items.map(\.userId)
                cursor = explanation.nextCursor
            } while cursor != nil
            #expect(users.count == 2 && Set(users).count == 2)
        }
    }

    @Test("the debug form: the latest event of a type, or a dry run to everyone when there is none")
    func debugForm() async throws {
        try await withCatalogue { org, _, client in
            let none = try await client.send(.get, "/v1/notifications/debug?event=ISQ_CRITICAL", token: org.ownerToken)
            #expect(none.status == .ok, "\(none.text)")
            let everyone = try none.decoded(Components.Schemas.Explanation.self)
            #expect(everyone.dryRun == true)
            #expect(everyone.items.allSatisfy { $0.rule == "everyone" })
            let sent = try await client.send(
                .post, "/v1/events", token: org.ownerToken,
                json: #"{"type": "ISQ_CRITICAL", "audience": {"user_ids": ["\#(org.memberID.uuidString)"]}}"#)
            let latest = try await client.send(
                .get, "/v1/notifications/debug?event=ISQ_CRITICAL&user_id=\(org.memberID.uuidString)", token: org.ownerToken)
            let explanation = try latest.decoded(Components.Schemas.Explanation.self)
            #expect(explanation.dryRun == false)
            #expect(try explanation.eventId == sent.decoded(Components.Schemas.EventAccepted.self).eventId)
            #expect(explanation.items.count == 1)
            // A user the event did not reach is said to be outside its audience, not an empty list.
            let outside = try await client.send(
                .get, "/v1/notifications/debug?event=ISQ_CRITICAL&user_id=\(org.ownerID.uuidString)", token: org.ownerToken)
            let untraced = try outside.decoded(Components.Schemas.Explanation.self).items
            #expect(untraced.map(\.reason) == ["NOT_IN_AUDIENCE"] && untraced.first?.targeted == false, "\(outside.text)")
            #expect(untraced.first?.userId == org.ownerID.uuidString.lowercased() && untraced.first?.channels == [])
            #expect(untraced.first?.rule == "none" && untraced.first?.reasonText.contains("audience") == true)
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
            let item = try #require(try feed.decoded(Components.Schemas.FeedPage.self).items.first)
            #expect(item.title == "ISQ critique 30")
            #expect(item.body.contains("&lt;IMP&gt;"))
        }
    }
}
