import Foundation
import HTTPTypes
import HeraldCore
import HeraldStore
import Hummingbird
import HummingbirdTesting
import PostgresNIO
import Testing

@testable import HeraldAPI

/// The medical-alert use case of the brief, through the API on the real stack.
@Suite("Notify: the medical alert")
struct MedicalAlertTests {
    let env: TestEnvironment

    init() async throws {
        env = try await TestEnvironment.shared
    }

    /// A clinic: the owner and the member are clinicians; three more clinicians with different
    /// preferences; a receptionist who is no clinician.
    struct Clinic {
        var org: TestOrganisation
        var catalogue: TestCatalogue
        var emailOff: UUID
        var digest: UUID
        var switchedOff: UUID
        var receptionist: UUID
        var memberToken: String
    }

    func clinic() async throws -> Clinic {
        let org = try await TestOrganisation.make()
        return try await clinic(org, try await TestCatalogue.make(in: org))
    }

    /// The clinic made in an organisation that has the test catalogue.
    func clinic(_ org: TestOrganisation, _ catalogue: TestCatalogue) async throws -> Clinic {
        let (emailOff, digest, switchedOff, receptionist) = try await org.store { tx in
            func clinician(_ name: String) async throws -> UUID {
                let user = try await tx.createUser(NewUser(email: "\(name)@clinic.example", displayName: name))
                _ = try await tx.setUserRoles(user.id, [catalogue.clinicianRole])
                return user.id
            }
            let emailOff = try await clinician("email-off")
            let digest = try await clinician("digest")
            let switchedOff = try await clinician("switched-off")
            let receptionist = try await tx.createUser(NewUser(email: "desk@clinic.example", displayName: "Desk")).id
            try await tx.replacePreferences(
                ofUser: emailOff,
                with: [
                    PreferenceCell(
                        categoryID: catalogue.alerts, channel: .email, setting: PreferenceSetting(enabled: false, frequency: .none))
                ])
            try await tx.replacePreferences(
                ofUser: digest,
                with: [
                    PreferenceCell(
                        categoryID: catalogue.alerts, channel: .email, setting: PreferenceSetting(enabled: true, frequency: .daily))
                ])
            try await tx.replacePreferences(
                ofUser: switchedOff,
                with: NotificationChannel.allCases.map {
                    PreferenceCell(categoryID: catalogue.alerts, channel: $0, setting: PreferenceSetting(enabled: false, frequency: .none))
                })
            return (emailOff, digest, switchedOff, receptionist)
        }
        return Clinic(
            org: org, catalogue: catalogue, emailOff: emailOff, digest: digest, switchedOff: switchedOff,
            receptionist: receptionist, memberToken: org.memberToken)
    }

    static let reading =
        #"{"type": "ISQ_CRITICAL", "audience": {"roles": ["clinician"]}, "payload": {"isq": 25, "threshold": 55, "implant": "IMP-19", "patient_name": "Jane Doe"}, "subject": {"type": "implant", "id": "IMP-19"}}"#

    @Test("a critical reading reaches every clinician of the organisation, each as their preferences say, and no one else")
    func criticalReading() async throws {
        // setup
        let clinic = try await clinic()
        let other = try await TestOrganisation.make()
        _ = try await TestCatalogue.make(in: other)
        let app = try env.application()
        try await app.test(.router) { client in
            let before = try await client.send(.get, "/v1/me/notifications/unread-count", token: clinic.memberToken)
            #expect(try before.decoded(Components.Schemas.UnreadCount.self).total == 0)

            // act
            let sent = try await client.send(.post, "/v1/events", token: clinic.org.ownerToken, json: Self.reading)

            // check: the answer counts each decision
            #expect(sent.status == .accepted, "\(sent.text)")
            let accepted = try sent.decoded(Components.Schemas.EventAccepted.self)
            let counts = accepted.counts
            #expect(counts.considered == 5) // five clinicians; the receptionist is not in the audience
            #expect(counts.targeted == 5)
            #expect(counts.inApp == 5) // critical: in-app even for the one who switched everything off
            #expect(counts.immediate == 2) // owner and member: email + immediate by the type's default
            #expect(counts.digest == 1)
            let eventID = accepted.eventId

            // The bell: visible at once, unread count up.
            let after = try await client.send(.get, "/v1/me/notifications/unread-count", token: clinic.memberToken)
                .decoded(Components.Schemas.UnreadCount.self)
            #expect(after.total == 1)
            #expect(after.byCategory.additionalProperties["alerts"] == 1)
            let feed = try await client.send(.get, "/v1/me/notifications", token: clinic.memberToken)
            let item = try #require(try feed.decoded(Components.Schemas.FeedPage.self).items.first)
            #expect(item.title == "Critical ISQ 25")
            #expect(item.severity == .critical)
            #expect(item.subject?.id == "IMP-19")
            #expect(!feed.text.contains("Jane Doe"), "a payload field the template did not ask for reached the feed")

            // Nobody of the other organisation was considered.
            let otherCount = try await client.send(.get, "/v1/me/notifications/unread-count", token: other.memberToken)
            #expect(try otherCount.decoded(Components.Schemas.UnreadCount.self).total == 0)

            // Explain: each case with its reason.
            let explain = try await client.send(.get, "/v1/events/\(eventID)/explain", token: clinic.org.ownerToken)
            #expect(explain.status == .ok)
            let users = try explain.decoded(Components.Schemas.Explanation.self).items
            func channel(_ user: UUID, _ name: Components.Schemas.ChannelName) -> Components.Schemas.ExplainedChannel? {
                let entry = users.first { $0.userId == user.uuidString.lowercased() }
                return entry?.channels.first { $0.channel == name }
            }
            #expect(users.count == 5)
            #expect(users.allSatisfy { $0.rule == "role:clinician" && $0.reason == "TARGETED_ROLE" })
            #expect(channel(clinic.org.memberID, .email)?.reason == "DELIVERY_QUEUED")
            #expect(channel(clinic.org.memberID, .email)?.deliveryStatus == "PENDING")
            #expect(channel(clinic.org.memberID, .email)?.source == .typeDefault)
            #expect(channel(clinic.emailOff, .email)?.reason == "CHANNEL_DISABLED")
            #expect(channel(clinic.emailOff, .email)?.source == .user)
            #expect(channel(clinic.emailOff, .inApp)?.reason == "IN_APP_CREATED")
            #expect(channel(clinic.org.memberID, .inApp)?.notificationStatus == .unread)
            #expect(channel(clinic.digest, .email)?.reason == "DIGEST_QUEUED")
            #expect(channel(clinic.digest, .email)?.digestStatus == .pending)
            #expect(channel(clinic.digest, .email)?.deliveryId == nil)
            #expect(channel(clinic.switchedOff, .inApp)?.source == .criticalOverride)
            #expect(channel(clinic.switchedOff, .email)?.reason == "CHANNEL_DISABLED")
            #expect(channel(clinic.switchedOff, .webhook)?.reason == "CHANNEL_DISABLED")

            // Explain follows the in-app row's life: read, then deleted by its user.
            let notificationID = try #require(channel(clinic.org.memberID, .inApp)?.notificationId)
            _ = try await client.send(.post, "/v1/me/notifications/\(notificationID)/read", token: clinic.memberToken)
            _ = try await client.send(.delete, "/v1/me/notifications/\(notificationID)", token: clinic.memberToken)
            let again = try await client.send(
                .get, "/v1/events/\(eventID)/explain?user_id=\(clinic.org.memberID.uuidString)", token: clinic.org.ownerToken)
            let inApp = try again.decoded(Components.Schemas.Explanation.self).items.first?.channels.first { $0.channel == .inApp }
            #expect(inApp?.notificationStatus == .deleted)
        }
    }

    @Test("a non-critical category switched off means nothing at all, with the reason")
    func categoryOff() async throws {
        try await withCatalogue { org, catalogue, client in
            let clinic = try await clinic(org, catalogue)
            try await clinic.org.store { tx in
                try await tx.replacePreferences(
                    ofUser: clinic.org.memberID,
                    with: NotificationChannel.allCases.map {
                        PreferenceCell(
                            categoryID: clinic.catalogue.activity, channel: $0, setting: PreferenceSetting(enabled: false, frequency: .none)
                        )
                    })
            }
            let sent = try await client.send(
                .post, "/v1/events", token: clinic.org.ownerToken,
                json: """
                    {"type": "TASK_ASSIGNED", "audience": {"user_ids": ["\(clinic.org.memberID.uuidString)"]}, "payload": {"title": "Review"}}
                    """)
            #expect(sent.status == .accepted)
            let accepted = try sent.decoded(Components.Schemas.EventAccepted.self)
            #expect(accepted.counts.inApp == 0)
            let count = try await client.send(.get, "/v1/me/notifications/unread-count", token: clinic.memberToken)
            #expect(try count.decoded(Components.Schemas.UnreadCount.self).total == 0)
            let explain = try await client.send(
                .get, "/v1/events/\(accepted.eventId)/explain?user_id=\(clinic.org.memberID.uuidString)", token: clinic.org.ownerToken)
            let channels = try #require(try explain.decoded(Components.Schemas.Explanation.self).items.first).channels
            #expect(channels.count == 4)
            // reason_text is a required string of ExplainedChannel: the decode checks it.
            #expect(channels.allSatisfy { $0.reason == "CHANNEL_DISABLED" })
        }
    }

    @Test("a reminder scheduled under the caller's own key is found by that key and cancelled (a trial kept no event ids)")
    func eventByIdempotencyKey() async throws {
        try await withCatalogue { org, _, client in
            let later = Date().addingTimeInterval(3 * 86_400).formatted(.iso8601)
            let body =
                #"{"type": "TASK_ASSIGNED", "audience": {"user_ids": ["\#(org.memberID.lowercased)"]}, "payload": {"title": "Trial ends"}, "deliver_at": "\#(later)"}"#
            let key = HTTPField.Name("Idempotency-Key")!
            let sent = try await client.send(.post, "/v1/events", token: org.ownerToken, json: body, headers: [key: "trial-ends-4411"])
            #expect(sent.status == .accepted, "\(sent.text)")
            let id = try sent.decoded(Components.Schemas.EventAccepted.self).eventId
            _ = try await client.send(.post, "/v1/events", token: org.ownerToken, json: body, headers: [key: "trial-ends-9999"])
            let found = try await client.send(.get, "/v1/events?idempotency_key=trial-ends-4411&state=scheduled", token: org.ownerToken)
            #expect(try found.decoded(Components.Schemas.EventPage.self).items.map(\.id) == [id], "\(found.text)")
            #expect(try await client.send(.post, "/v1/events/\(id)/cancel", token: org.ownerToken).status == .ok)
            let none = try await client.send(.get, "/v1/events?idempotency_key=trial-ends-4411&state=scheduled", token: org.ownerToken)
            #expect(try none.decoded(Components.Schemas.EventPage.self).items.isEmpty)
            // Another organisation's key names nothing here.
            let other = try await TestOrganisation.make()
            let elsewhere = try await client.send(.get, "/v1/events?idempotency_key=trial-ends-4411", token: other.ownerToken)
            #expect(try elsewhere.decoded(Components.Schemas.EventPage.self).items.isEmpty, "\(elsewhere.text)")
        }
    }

    @Test("an in-app cell of a critical category that the override would overrule is refused, for a user and as a default")
    func criticalInAppCellRefused() async throws {
        try await withCatalogue { org, catalogue, client in
            for (path, token) in [("/v1/me/preferences", org.memberToken), ("/v1/organisation/preference-defaults", org.ownerToken)] {
                for cell in [
                    #"{"category": "alerts", "channel": "in_app", "enabled": false, "frequency": "NONE"}"#,
                    #"{"category": "alerts", "channel": "in_app", "enabled": true, "frequency": "DAILY"}"#,
                    #"{"category": "alerts", "channel": "in_app", "enabled": true, "frequency": "IMMEDIATE", "conditions": [{"field": "payload.isq", "op": "lte", "value": 40}]}"#,
                ] {
                    let refused = try await client.send(
                        .put, path, token: token,
                        json: #"{"items": [{"category": "activity", "channel": "email", "enabled": false, "frequency": "NONE"}, \#(cell)]}"#
                    )
                    #expect(refused.isProblem(.unprocessableContent), "\(path) \(cell) → \(refused.text)")
                    #expect((refused.json["detail"] as? String)?.hasPrefix("items[1]") == true, "\(refused.text)")
                    #expect((refused.json["detail"] as? String)?.contains("always on") == true, "\(refused.text)")
                }
                // Nothing of the refused list was stored.
                let stored = try await client.send(.get, path, token: token)
                #expect(try stored.decoded(Components.Schemas.PreferenceList.self).items.isEmpty, "\(path) \(stored.text)")
                // The cell as the override has it is accepted; email of a critical category is the user's to switch off.
                let accepted = try await client.send(
                    .put, path, token: token,
                    json:
                        #"{"items": [{"category": "alerts", "channel": "in_app", "enabled": true, "frequency": "IMMEDIATE"}, {"category": "alerts", "channel": "email", "enabled": false, "frequency": "NONE"}]}"#
                )
                #expect(accepted.status == .ok, "\(path) \(accepted.text)")
            }
            // A category made critical loses the in-app cells that would now be ignored.
            let muted = try await client.send(
                .put, "/v1/me/preferences", token: org.memberToken,
                json: #"{"items": [{"category": "activity", "channel": "in_app", "enabled": false, "frequency": "NONE"}]}"#)
            #expect(muted.status == .ok, "\(muted.text)")
            let critical = try await client.send(
                .patch, "/v1/categories/\(catalogue.activity.lowercased)", token: org.ownerToken, json: #"{"critical": true}"#)
            #expect(critical.status == .ok, "\(critical.text)")
            let kept = try await client.send(.get, "/v1/me/preferences", token: org.memberToken)
            #expect(try kept.decoded(Components.Schemas.PreferenceList.self).items.allSatisfy { $0.category != "activity" }, "\(kept.text)")
        }
    }

    @Test(
        "PATCH sets and clears some cells and leaves the others: a section saved alone does not undo another (a trial lost its digest settings)"
    )
    func patchPreferences() async throws {
        try await withCatalogue { org, _, client in
            let put = try await client.send(
                .put, "/v1/me/preferences", token: org.memberToken,
                json:
                    #"{"items": [{"category": "activity", "channel": "email", "enabled": true, "frequency": "DAILY"}, {"category": "alerts", "channel": "email", "enabled": true, "frequency": "WEEKLY"}]}"#
            )
            #expect(put.status == .ok, "\(put.text)")
            func cells(_ response: TestResponse) throws -> [String: Components.Schemas.FrequencyName] {
                Dictionary(
                    uniqueKeysWithValues: try response.decoded(Components.Schemas.PreferenceList.self).items.map {
                        ("\($0.category)/\($0.channel.rawValue)", $0.frequency)
                    })
            }
            // Another section: in-app of activity off. Both digest settings stay.
            let patched = try await client.send(
                .patch, "/v1/me/preferences", token: org.memberToken,
                json: #"{"items": [{"category": "activity", "channel": "in_app", "enabled": false, "frequency": "NONE"}]}"#)
            #expect(patched.status == .ok, "\(patched.text)")
            #expect(try cells(patched) == ["activity/email": .daily, "alerts/email": .weekly, "activity/in_app": .none])
            // A cell set again and one put back to inheriting.
            let again = try await client.send(
                .patch, "/v1/me/preferences", token: org.memberToken,
                json:
                    #"{"items": [{"category": "activity", "channel": "email", "enabled": true, "frequency": "WEEKLY"}], "inherit": [{"category": "alerts", "channel": "email"}]}"#
            )
            #expect(try cells(again) == ["activity/email": .weekly, "activity/in_app": .none], "\(again.text)")
            #expect(try cells(try await client.send(.get, "/v1/me/preferences", token: org.memberToken)) == (try cells(again)))
            // Checked as a PUT of the result: a chat cell, a cell both set and inherited; nothing changes.
            for (body, field) in [
                (
                    #"{"items": [{"category": "activity", "channel": "chat", "enabled": true, "frequency": "IMMEDIATE"}]}"#,
                    "items[2].channel"
                ),
                (
                    #"{"items": [{"category": "activity", "channel": "email", "enabled": false, "frequency": "NONE"}], "inherit": [{"category": "activity", "channel": "email"}]}"#,
                    "inherit[0]"
                ),
            ] {
                let refused = try await client.send(.patch, "/v1/me/preferences", token: org.memberToken, json: body)
                #expect(refused.isProblem(.unprocessableContent), "\(refused.text)")
                #expect((refused.json["detail"] as? String)?.hasPrefix(field) == true, "\(refused.text)")
            }
            #expect(try cells(try await client.send(.get, "/v1/me/preferences", token: org.memberToken)) == (try cells(again)))
            // An admin changes one of the member's cells the same way; the member cannot change the owner's.
            let admin = try await client.send(
                .patch, "/v1/users/\(org.memberID.lowercased)/preferences", token: org.ownerToken,
                json: #"{"inherit": [{"category": "activity", "channel": "in_app"}]}"#)
            #expect(try cells(admin) == ["activity/email": .weekly], "\(admin.text)")
            let member = try await client.send(
                .patch, "/v1/users/\(org.ownerID.lowercased)/preferences", token: org.memberToken, json: #"{"items": []}"#)
            #expect(member.isProblem(.forbidden), "\(member.text)")
        }
    }

    @Test("resolved preferences without a type follow the category's types' defaults and name them; ?category= narrows")
    func resolvedWithoutType() async throws {
        try await withCatalogue { org, catalogue, client in
            let billing = try await org.store { tx in
                try await tx.createCategory(key: "billing", name: "Billing", description: "", critical: false).id
            }
            try await org.deliveryType("INVOICE_PAID", category: billing, channels: [.email])
            try await org.deliveryType("TRIAL_ENDING", category: billing, channels: [.inApp])
            func cells(_ query: String, token: String? = nil) async throws -> [Components.Schemas.ResolvedPreference] {
                let answer = try await client.send(.get, "/v1/me/preferences/resolved\(query)", token: token ?? org.memberToken)
                #expect(answer.status == .ok, "\(query) → \(answer.text)")
                return try answer.decoded(Components.Schemas.ResolvedPreferences.self).items
            }
            // Email is on: one of the category's types sends by email by default (an email-only
            // category's cells read "in-app only" before, though its events went by email).
            let all = try await cells("?category=billing")
            #expect(Set(all.map(\.category)) == ["billing"] && all.count == 4)
            let email = try #require(all.first { $0.channel == .email })
            #expect(email.enabled && email.frequency == .immediate && email.source == .typeDefault)
            #expect(email.defaultForTypes == ["INVOICE_PAID"])
            #expect(all.first { $0.channel == .inApp }?.defaultForTypes == ["TRIAL_ENDING"])
            let webhook = try #require(all.first { $0.channel == .webhook })
            #expect(!webhook.enabled && webhook.defaultForTypes == [])
            // Every category without ?category=; a category without types stays in-app only.
            let every = try await cells("")
            #expect(Set(every.map(\.category)).isSuperset(of: ["alerts", "activity", "billing"]))
            #expect(every.first { $0.category == "billing" && $0.channel == .email }?.enabled == true)
            // With a type, its own defaults, and no list of types.
            let trial = try await cells("?type=TRIAL_ENDING&category=billing")
            #expect(trial.first { $0.channel == .email }.map { !$0.enabled && $0.defaultForTypes == nil } == true)
            // The user's own setting wins and names no types.
            let put = try await client.send(
                .put, "/v1/me/preferences", token: org.memberToken,
                json: #"{"items": [{"category": "billing", "channel": "email", "enabled": false, "frequency": "NONE"}]}"#)
            #expect(put.status == .ok)
            let own = try #require(try await cells("?category=billing").first { $0.channel == .email })
            #expect(!own.enabled && own.source == .user && own.defaultForTypes == nil)
            // An admin reads the same for the user.
            let admin = try await client.send(
                .get, "/v1/users/\(org.memberID)/preferences/resolved?category=billing", token: org.ownerToken)
            #expect(try admin.decoded(Components.Schemas.ResolvedPreferences.self).items.count == 4)
            // Unknown category, or a type of another category: 422 naming the parameter.
            for (query, field) in [("?category=nope", "category"), ("?type=INVOICE_PAID&category=alerts", "type")] {
                let refused = try await client.send(.get, "/v1/me/preferences/resolved\(query)", token: org.memberToken)
                #expect(refused.isProblem(.unprocessableContent), "\(query) → \(refused.text)")
                #expect((refused.json["detail"] as? String)?.hasPrefix(field) == true, "\(refused.text)")
            }
            _ = catalogue
        }
    }

    @Test("switching email off through the API leaves in-app only; DAILY makes a digest item, no email")
    func preferencesThroughAPI() async throws {
        try await withCatalogue { org, catalogue, client in
            let clinic = try await clinic(org, catalogue)
            let put = try await client.send(
                .put, "/v1/me/preferences", token: clinic.memberToken,
                json: #"{"items": [{"category": "alerts", "channel": "email", "enabled": false, "frequency": "NONE"}]}"#)
            #expect(put.status == .ok)
            let resolved = try await client.send(.get, "/v1/me/preferences/resolved?type=ISQ_CRITICAL", token: clinic.memberToken)
            let cells = try resolved.decoded(Components.Schemas.ResolvedPreferences.self).items
            #expect(cells.first { $0.channel == .email }?.source == .user)
            #expect(cells.first { $0.channel == .inApp }?.source == .criticalOverride)
            let onlyMember = Self.reading.replacingOccurrences(
                of: #""roles": ["clinician"]"#, with: #""user_ids": ["\#(clinic.org.memberID.uuidString)"]"#)
            let first = try await client.send(.post, "/v1/events", token: clinic.org.ownerToken, json: onlyMember)
            let firstCounts = try first.decoded(Components.Schemas.EventAccepted.self).counts
            #expect(firstCounts.immediate == 0)
            #expect(firstCounts.inApp == 1)

            _ = try await client.send(
                .put, "/v1/me/preferences", token: clinic.memberToken,
                json: #"{"items": [{"category": "alerts", "channel": "email", "enabled": true, "frequency": "DAILY"}]}"#)
            let second = try await client.send(.post, "/v1/events", token: clinic.org.ownerToken, json: onlyMember)
            let secondCounts = try second.decoded(Components.Schemas.EventAccepted.self).counts
            #expect(secondCounts.digest == 1)
            #expect(secondCounts.immediate == 0)

            // Webhook and chat go to the organisation's endpoints: a user's own cell for them is
            // refused (a trial's member switched the team's Slack on for their own alerts).
            for channel in ["chat", "webhook"] {
                let mine = try await client.send(
                    .put, "/v1/me/preferences", token: clinic.memberToken,
                    json: #"{"items": [{"category": "alerts", "channel": "\#(channel)", "enabled": true, "frequency": "IMMEDIATE"}]}"#)
                #expect(mine.isProblem(.unprocessableContent), "\(mine.text)")
                #expect((mine.json["detail"] as? String)?.hasPrefix("items[0].channel") == true, "\(mine.text)")
            }
            // Digests go by email only: the organisation's chat default set to WEEKLY is kept as
            // set, and sent at once (DELIVERY_QUEUED in the trace; EngineTests.outcomes) rather than held.
            let chat = try await client.send(
                .put, "/v1/organisation/preference-defaults", token: clinic.org.ownerToken,
                json: #"{"items": [{"category": "alerts", "channel": "chat", "enabled": true, "frequency": "WEEKLY"}]}"#)
            #expect(chat.status == .ok, "\(chat.text)")
        }
    }

    @Test("quiet hours hold a member's email until they end in their zone; critical events and the bell are not held")
    func quietHoursThroughAPI() async throws {
        try await withCatalogue { org, catalogue, client in
            // A member's own quiet hours, shown back in their profile and to an administrator.
            let set = try await client.send(
                .patch, "/v1/me", token: org.memberToken,
                json: #"{"timezone": "Europe/Paris", "quiet_hours": {"start": "22:00", "end": "07:00"}}"#)
            #expect(set.status == .ok, "\(set.text)")
            let profile = try set.decoded(Components.Schemas.Principal.self).profile
            #expect(profile?.quietHours == .init(start: "22:00", end: "07:00"))
            let shown = try await client.send(.get, "/v1/users/\(org.memberID.uuidString)", token: org.ownerToken)
            #expect(try shown.decoded(Components.Schemas.User.self).quietHours == .init(start: "22:00", end: "07:00"))
            // Given when a user is made, one at a time or imported, and changed by an administrator.
            let made = try await client.send(
                .post, "/v1/users", token: org.ownerToken,
                json: #"{"email": "night@x.example", "display_name": "Night", "quiet_hours": {"start": "23:00", "end": "06:00"}}"#)
            #expect(made.status == .created, "\(made.text)")
            let madeUser = try made.decoded(Components.Schemas.User.self)
            #expect(madeUser.quietHours == .init(start: "23:00", end: "06:00"))
            let imported = try await client.send(
                .post, "/v1/users/import", token: org.ownerToken,
                json: """
                    {"users": [{"email": "owl@x.example", "display_name": "Owl", "quiet_hours": {"start": "01:00", "end": "09:30"}},
                               {"email": "lark@x.example", "display_name": "Lark", "quiet_hours": {}}]}
                    """)
            #expect(imported.status == .ok, "\(imported.text)")
            let importedIDs = try imported.decoded(Components.Schemas.UserImportResult.self).users.map(\.id)
            let owl = try await client.send(.get, "/v1/users/\(importedIDs[0])", token: org.ownerToken)
            #expect(try owl.decoded(Components.Schemas.User.self).quietHours == .init(start: "01:00", end: "09:30"))
            let lark = try await client.send(.get, "/v1/users/\(importedIDs[1])", token: org.ownerToken)
            #expect(try lark.decoded(Components.Schemas.User.self).quietHours == nil)
            let changed = try await client.send(
                .patch, "/v1/users/\(madeUser.id)", token: org.ownerToken, json: #"{"quiet_hours": {"start": "21:00", "end": "05:00"}}"#)
            #expect(try changed.decoded(Components.Schemas.User.self).quietHours == .init(start: "21:00", end: "05:00"))
            let badImport = try await client.send(
                .post, "/v1/users/import", token: org.ownerToken,
                json: #"{"users": [{"email": "bat@x.example", "display_name": "Bat", "quiet_hours": {"end": "05:00"}}]}"#)
            #expect(badImport.isProblem(.unprocessableContent) && badImport.text.contains("users[0].quiet_hours"), "\(badImport.text)")
            // What is not a window: 422 naming the field; a null says what clears them.
            for (body, field) in [
                (#"{"quiet_hours": {"start": "22:00"}}"#, "quiet_hours"),
                (#"{"quiet_hours": {"start": "7:00", "end": "09:00"}}"#, "quiet_hours.start"),
                (#"{"quiet_hours": {"start": "08:00", "end": "24:00"}}"#, "quiet_hours.end"),
                (#"{"quiet_hours": {"start": "08:00", "end": "08:00"}}"#, "quiet_hours"),
            ] {
                let refused = try await client.send(.patch, "/v1/me", token: org.memberToken, json: body)
                #expect(refused.isProblem(.unprocessableContent), "\(body) → \(refused.text)")
                #expect((refused.json["detail"] as? String)?.hasPrefix(field) == true, "\(refused.text)")
            }
            let null = try await client.send(.patch, "/v1/me", token: org.memberToken, json: #"{"quiet_hours": null}"#)
            #expect(null.isProblem(.badRequest) && null.text.contains("{}"), "\(null.text)")

            // Email on for the member's activity; an event due at 23:30 in Paris, two days ahead.
            let email = try await client.send(
                .put, "/v1/me/preferences", token: org.memberToken,
                json: #"{"items": [{"category": "activity", "channel": "email", "enabled": true, "frequency": "IMMEDIATE"}]}"#)
            #expect(email.status == .ok, "\(email.text)")
            let paris = try #require(TimeZone(identifier: "Europe/Paris"))
            var calendar = Calendar(identifier: .gregorian)
            calendar.timeZone = paris
            let day = try #require(calendar.date(byAdding: .day, value: 2, to: Date()))
            let due = try #require(calendar.date(bySettingHour: 23, minute: 30, second: 0, of: day))
            let nextDay = try #require(calendar.date(byAdding: .day, value: 1, to: day))
            let morning = try #require(calendar.date(bySettingHour: 7, minute: 0, second: 0, of: nextDay))
            func send(priority: String) async throws -> String {
                let sent = try await client.send(
                    .post, "/v1/events", token: org.ownerToken,
                    json: """
                        {"type": "TASK_ASSIGNED", "priority": "\(priority)", "deliver_at": "\(RFC3339.wholeSeconds(due))",
                         "payload": {"title": "Review"}, "audience": {"user_ids": ["\(org.memberID.uuidString)"]}}
                        """)
                #expect(sent.status == .accepted, "\(sent.text)")
                return try sent.decoded(Components.Schemas.EventAccepted.self).eventId
            }
            func emailOf(_ event: String) async throws -> (reason: String?, due: Date?, explainedDue: Date?) {
                let explain = try await client.send(
                    .get, "/v1/events/\(event)/explain?user_id=\(org.memberID.uuidString)", token: org.ownerToken)
                let channel = try explain.decoded(Components.Schemas.Explanation.self).items.first?.channels.first { $0.channel == .email }
                let deliveries = try await client.send(.get, "/v1/deliveries?event_id=\(event)", token: org.ownerToken)
                return (
                    channel?.reason, try deliveries.decoded(Components.Schemas.DeliveryPage.self).items.first?.nextAttemptAt,
                    channel?.deliveryDueAt
                )
            }
            let held = try await emailOf(try await send(priority: "normal"))
            #expect(held.reason == "HELD_QUIET_HOURS")
            // Explain says when it goes, as the delivery list does.
            #expect(held.explainedDue.map { abs($0.timeIntervalSince(morning)) < 1 } == true)
            #expect(held.due.map { abs($0.timeIntervalSince(morning)) < 1 } == true, "\(String(describing: held.due)) against \(morning)")
            let critical = try await emailOf(try await send(priority: "critical"))
            #expect(critical.reason == "DELIVERY_QUEUED")
            #expect(critical.due.map { abs($0.timeIntervalSince(due)) < 1 } == true)

            // {} clears them: the next event's email is due with it.
            let cleared = try await client.send(.patch, "/v1/me", token: org.memberToken, json: #"{"quiet_hours": {}}"#)
            #expect(try cleared.decoded(Components.Schemas.Principal.self).profile?.quietHours == nil)
            let after = try await emailOf(try await send(priority: "normal"))
            #expect(after.reason == "DELIVERY_QUEUED" && after.due.map { abs($0.timeIntervalSince(due)) < 1 } == true)
            _ = catalogue
        }
    }

    @Test("bad events are refused and write nothing")
    func badEvents() async throws {
        try await withCatalogue { org, catalogue, client in
            let clinic = try await clinic(org, catalogue)
            let cases = [
                (#"{"type": "NOPE", "audience": {"everyone": true}}"#, HTTPResponse.Status.unprocessableContent, "type"),
                (#"{"type": "ISQ_CRITICAL", "audience": {}}"#, .unprocessableContent, "audience"),
                (#"{"type": "ISQ_CRITICAL", "audience": {"roles": ["astronaut"]}}"#, .unprocessableContent, "astronaut"),
                (#"{"type": "ISQ_CRITICAL", "audience": {"user_ids": ["\#(UUID().uuidString)"]}}"#, .unprocessableContent, "user"),
                (
                    #"{"type": "ISQ_CRITICAL", "audience": {"everyone": true}, "expires_at": "2020-01-01T00:00:00Z"}"#,
                    .unprocessableContent, "expires_at"
                ),
                (#"{"type": "ISQ_CRITICAL", "audience": {"everyone": true}, "organisation_id": "x"}"#, .badRequest, "organisation_id"),
            ]
            for (body, status, mention) in cases {
                let response = try await client.send(.post, "/v1/events", token: clinic.org.ownerToken, json: body)
                #expect(response.isProblem(status), "\(body) → \(response.status) \(response.text)")
                #expect((response.json["detail"] as? String)?.contains(mention) == true, "\(response.text)")
            }
            let events = try await clinic.org.store { tx in try await tx.events(typeID: nil, limit: 10, after: nil).items.count }
            #expect(events == 0)
        }
    }

    @Test("a scheduled event stays out of the feed until its time; cancelling withdraws what has not gone out")
    func scheduledAndCancelled() async throws {
        try await withCatalogue { org, catalogue, client in
            let clinic = try await clinic(org, catalogue)
            let later = ISO8601DateFormatter().string(from: Date().addingTimeInterval(3600))
            let body = Self.reading.replacingOccurrences(of: #""subject""#, with: #""deliver_at": "\#(later)", "subject""#)
            let sent = try await client.send(.post, "/v1/events", token: clinic.org.ownerToken, json: body)
            #expect(sent.status == .accepted)
            let id = try sent.decoded(Components.Schemas.EventAccepted.self).eventId
            let count = try await client.send(.get, "/v1/me/notifications/unread-count", token: clinic.memberToken)
            #expect(try count.decoded(Components.Schemas.UnreadCount.self).total == 0)
            let cancelled = try await client.send(.post, "/v1/events/\(id)/cancel", token: clinic.org.ownerToken)
            #expect(cancelled.status == .ok)
            let cancellation = try cancelled.decoded(Components.Schemas.Cancellation.self)
            #expect(cancellation.deliveriesCancelled == 2)
            #expect(cancellation.digestItemsCancelled == 1)
            #expect(cancellation.notificationsWithdrawn == 5)
            #expect(try await client.send(.post, "/v1/events/\(id)/cancel", token: clinic.org.ownerToken).isProblem(.conflict))
            let explain = try await client.send(
                .get, "/v1/events/\(id)/explain?user_id=\(clinic.org.memberID.uuidString)", token: clinic.org.ownerToken)
            let email = try explain.decoded(Components.Schemas.Explanation.self).items.first?.channels.first { $0.channel == .email }
            #expect(email?.deliveryStatus == "CANCELLED")
        }
    }
}

@Suite("Notify: idempotency")
struct IdempotencyTests {
    let env: TestEnvironment

    init() async throws {
        env = try await TestEnvironment.shared
    }

    func send(_ client: some TestClientProtocol, _ org: TestOrganisation, key: String, isq: Int = 25) async throws -> TestResponse {
        try await client.send(
            .post, "/v1/events", token: org.ownerToken,
            json: #"{"type": "ISQ_CRITICAL", "audience": {"roles": ["clinician"]}, "payload": {"isq": \#(isq)}}"#,
            headers: [HTTPField.Name("Idempotency-Key")!: key])
    }

    @Test("a key given twice is a 400, not a third key made of both (a trial)")
    func keyGivenTwice() async throws {
        try await withCatalogue { org, _, client in
            var headers = HTTPFields()
            headers.append(HTTPField(name: .authorization, value: "Bearer \(org.ownerToken)"))
            headers.append(HTTPField(name: .contentType, value: "application/json"))
            headers.append(HTTPField(name: HTTPField.Name("Idempotency-Key")!, value: "reading-a"))
            headers.append(HTTPField(name: HTTPField.Name("Idempotency-Key")!, value: "reading-b"))
            let body = #"{"type": "ISQ_CRITICAL", "audience": {"roles": ["clinician"]}, "payload": {"isq": 25}}"#
            let response = try await client.execute(uri: "/v1/events", method: .post, headers: headers, body: ByteBuffer(string: body))
            #expect(response.status == .badRequest)
            #expect(String(buffer: response.body).contains("Idempotency-Key: the header is given more than once"))
            #expect(try await org.store { tx in try await tx.events(typeID: nil, limit: 10, after: nil).items.count } == 0)
        }
    }

    @Test("the same key and body answer the first response again, and write nothing more")
    func replay() async throws {
        try await withCatalogue { org, _, client in
            let first = try await send(client, org, key: "reading-1")
            let second = try await send(client, org, key: "reading-1")
            #expect(first.status == .accepted && second.status == .accepted)
            #expect(first.text == second.text)
            #expect(second.headers[HTTPField.Name("Idempotent-Replayed")!] == "true")
            #expect(first.headers[HTTPField.Name("Idempotent-Replayed")!] == nil)
            #expect(try await org.store { tx in try await tx.events(typeID: nil, limit: 10, after: nil).items.count } == 1)
            // Cancelled since: the replay says so (a retrying client must not believe it is still going out).
            let id = try #require(first.json["event_id"] as? String)
            #expect(try await client.send(.post, "/v1/events/\(id)/cancel", token: org.ownerToken).status == .ok)
            let third = try await send(client, org, key: "reading-1")
            #expect(third.status == .accepted && third.json["status"] as? String == "CANCELLED", "\(third.text)")
            #expect(third.headers[HTTPField.Name("Idempotent-Replayed")!] == "true")
        }
    }

    @Test("the same key with another body is 422")
    func differentBody() async throws {
        try await withCatalogue { org, _, client in
            #expect(try await send(client, org, key: "reading-2").status == .accepted)
            let other = try await send(client, org, key: "reading-2", isq: 30)
            #expect(other.isProblem(.unprocessableContent))
            #expect((other.json["detail"] as? String)?.contains("Idempotency-Key") == true)
        }
    }

    @Test("the same key while the first request still runs is 409")
    func stillRunning() async throws {
        let org = try await TestOrganisation.make()
        _ = try await TestCatalogue.make(in: org)
        let app = try env.application()
        // Hold the key's lock the way a running first request does.
        try await env.database.withTenant(org.id) { tx in
            #expect(try await tx.lockIdempotencyKey("reading-3"))
            try await app.test(.router) { client in
                let response = try await send(client, org, key: "reading-3")
                #expect(response.isProblem(.conflict))
            }
        }
        // Once the first is done, the key works.
        try await app.test(.router) { client in
            let response = try await send(client, org, key: "reading-3")
            #expect(response.status == .accepted)
        }
    }

    @Test("keys are scoped per organisation")
    func perOrganisation() async throws {
        let a = try await TestOrganisation.make()
        let b = try await TestOrganisation.make()
        _ = try await TestCatalogue.make(in: a)
        _ = try await TestCatalogue.make(in: b)
        let app = try env.application()
        try await app.test(.router) { client in
            let first = try await send(client, a, key: "shared-key")
            let second = try await send(client, b, key: "shared-key")
            #expect(first.status == .accepted && second.status == .accepted)
            let firstID = try first.decoded(Components.Schemas.EventAccepted.self).eventId
            #expect(try second.decoded(Components.Schemas.EventAccepted.self).eventId != firstID)
            #expect(second.headers[HTTPField.Name("Idempotent-Replayed")!] == nil)
        }
    }
}
