import Foundation
import HTTPTypes
import HeraldCore
import HummingbirdTesting
import NIOCore
import PostgresNIO
import Synchronization
import Testing

@testable import HeraldDelivery
@testable import HeraldStore

/// Digests that are sent (issue 11): digest runs on the work runner, against the real SMTP
/// server, with a controlled clock (the runs' due times follow it; nothing sleeps until 08:00).
@Suite("Digests")
struct DigestTests {
    /// An organisation whose member wants `activity` by email in a DAILY digest, in Paris.
    func clubMember() async throws -> (TestOrganisation, TestCatalogue) {
        let org = try await TestOrganisation.make()
        let catalogue = try await TestCatalogue.make(in: org)
        try await org.store { tx in
            try await tx.query(
                "UPDATE users SET timezone = 'Europe/Paris' WHERE organisation_id = \(org.id) AND id = \(org.memberID)")
            try await tx.replacePreferences(
                ofUser: org.memberID,
                with: [
                    PreferenceCell(
                        categoryID: catalogue.activity, channel: .email, setting: PreferenceSetting(enabled: true, frequency: .daily))
                ])
        }
        return (org, catalogue)
    }

    func task(
        _ org: TestOrganisation, _ title: String, url: String? = nil, to users: [UUID]? = nil, expiresAt: Date? = nil
    )
        async throws -> UUID
    {
        try await org.notify(
            EventRequest(
                typeKey: "TASK_ASSIGNED", audience: Audience(userIDs: users ?? [org.memberID]), payload: .object(["title": .string(title)]),
                expiresAt: expiresAt, url: url)
        ).event.id
    }

    /// The digest items of `user`, with their slot, run and state.
    func items(_ org: TestOrganisation, of user: UUID) async throws -> [(slot: Date, run: UUID?, sent: Bool, dropped: String?)] {
        try await org.store { tx in
            try await tx.query(
                """
                SELECT slot_at, run_id, sent_at IS NOT NULL, dropped_reason FROM digest_items
                WHERE organisation_id = \(org.id) AND user_id = \(user) ORDER BY created_at
                """
            ).map { try $0.decode((Date, UUID?, Bool, String?).self) }
        }
    }

    /// Whether the member has `runs` digests: as many emails, and as many runs recorded SENT
    /// (the acceptance is recorded just after the SMTP server answered).
    func sent(_ org: TestOrganisation, _ address: String, runs: Int) async throws -> Bool {
        let recorded = try await org.store { tx in try await tx.digestRuns(of: org.memberID) }.filter { $0.status == .sent }.count
        return try await Peers.mail(to: address).count == runs && recorded == runs
    }

    /// Runs `runners` digest runners for `organisation` on the clock `now` while `body` runs.
    func withDigestRunners<T: Sendable>(
        _ organisation: UUID, count: Int = 1, now: @escaping @Sendable () -> Date, _ body: @Sendable () async throws -> T
    ) async throws -> T {
        let env = try await TestEnvironment.shared
        let email = EmailTransport(
            settings: EmailTransport.settings(url: Peers.smtpURL, username: nil, password: nil, timeout: 10)!,
            defaultFrom: "herald@herald.test")
        let links = LinkBuilder(baseURL: "http://herald.test", keys: TestEnvironment.linkKeys)
        let bus = NotificationBus(client: env.workerClient, logger: env.logger)
        let runners = (0..<count).map { index in
            var configuration = WorkRunnerConfiguration(name: "digest-test-\(index)-\(UUID().uuidString.prefix(6))")
            configuration.concurrency = 4
            configuration.batchSize = 4
            configuration.pollInterval = .milliseconds(100)
            configuration.leaseSeconds = 10
            return WorkRunner(
                configuration: configuration, queue: DigestQueue(database: env.workerDatabase, organisation: organisation, now: now),
                handler: DigestHandler(
                    database: env.workerDatabase, email: email, links: links,
                    retry: RetryPolicy(baseDelay: 0.3, factor: 2, maximumDelay: 5, jitter: 0), worker: configuration.name, now: now),
                bus: bus, logger: env.logger)
        }
        return try await withThrowingTaskGroup(of: T?.self) { group in
            group.addTask {
                try await bus.run(); return nil
            }
            for runner in runners {
                group.addTask {
                    try await runner.run(); return nil
                }
            }
            let value = try await body()
            group.cancelAll()
            for try await _ in group {}
            return value
        }
    }

    @Test(
        "a DAILY digest goes once at the member's local 08:00, grouped, with tracked links and one-click unsubscribe; a late item goes in the next"
    )
    func dailyDigest() async throws {
        let (org, _) = try await clubMember()
        let address = "member@\(org.slug).example"
        _ = try await task(org, "Outing on Saturday", url: "https://club.example/outings/42")
        _ = try await task(org, "Outing on Sunday & Monday <early>")
        let pending = try await items(org, of: org.memberID)
        try #require(pending.count == 2)
        // The slot: the next 08:00 in Paris after now, the same for both items.
        let slot = try #require(pending.first?.slot)
        let paris = TimeZone(identifier: "Europe/Paris")!
        let calendar = {
            var calendar = Calendar(identifier: .gregorian)
            calendar.timeZone = paris
            return calendar
        }()
        #expect(calendar.component(.hour, from: slot) == 8 && calendar.component(.minute, from: slot) == 0)
        #expect(slot > Date() && slot <= Date().addingTimeInterval(24 * 3600))
        #expect(pending.allSatisfy { $0.slot == slot && $0.run == nil })

        let clock = Mutex(slot.addingTimeInterval(-60))
        try await withDigestRunners(org.id, now: { clock.withLock { $0 } }) { () async throws -> Void in
            // A minute before the slot: nothing is made or sent.
            try await Task.sleep(for: .milliseconds(500))
            #expect(try await org.store { tx in try await tx.digestRuns(of: org.memberID) }.isEmpty)
            // The slot comes: one email with both items.
            clock.withLock { $0 = slot.addingTimeInterval(60) }
            #expect(try await eventually(timeout: .seconds(30)) { try await sent(org, address, runs: 1) })
            let runs = try await org.store { tx in try await tx.digestRuns(of: org.memberID) }
            try #require(runs.count == 1)
            #expect(runs[0].status == .sent && runs[0].itemCount == 2 && runs[0].slotAt == slot && runs[0].frequency == .daily)
            #expect(try await items(org, of: org.memberID).allSatisfy { $0.sent && $0.run == runs[0].id })
            let mail = try ParsedMail(try #require(try await Peers.mail(to: address).first?["data"] as? String))
            #expect(mail.headers["Subject"]?.contains("your daily digest (2 notifications)") == true, "\(mail.headers)")
            #expect(mail.headers["Message-ID"]?.contains("digest-\(runs[0].id.lowercased)@") == true)
            #expect(mail.headers["List-Unsubscribe"]?.contains("http://herald.test/v1/unsubscribe/") == true)
            #expect(mail.headers["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click")
            let text = try #require(mail.parts["text/plain"]).replacingOccurrences(of: "\r\n", with: "\n")
            #expect(text.contains("Activity\n  - Outing on Saturday"), "\(text)")
            #expect(text.contains("http://herald.test/v1/links/"), "a tracked link for the item with a URL")
            // Each part escaped for what it is: the text part as written, the HTML part once.
            #expect(text.contains("  - Outing on Sunday & Monday <early>\n"), "\(text)")
            let html = try #require(mail.parts["text/html"])
            #expect(html.contains("<h2>Activity</h2>") && html.contains("Outing on Sunday &amp; Monday &lt;early&gt;"), "\(html)")

            // An item stamped with a slot whose run is already frozen (its notify began before
            // the slot and committed after: here the real clock is still before the slot) goes
            // in the next day's digest.
            _ = try await task(org, "Late outing")
            let nextSlot = try #require(calendar.date(byAdding: .day, value: 1, to: slot))
            #expect(
                try await eventually(timeout: .seconds(10)) {
                    try await items(org, of: org.memberID).last?.slot == nextSlot
                }, "the late item moves to the next slot")
            try await Task.sleep(for: .milliseconds(300))
            #expect(try await Peers.mail(to: address).count == 1, "nothing more before the next slot")
            clock.withLock { $0 = nextSlot.addingTimeInterval(60) }
            #expect(try await eventually(timeout: .seconds(30)) { try await sent(org, address, runs: 2) })
            let second = try ParsedMail(try #require(try await Peers.mail(to: address).last?["data"] as? String))
            #expect(second.headers["Subject"]?.contains("(1 notification)") == true)
            #expect(second.parts["text/plain"]?.contains("Late outing") == true)
            #expect(second.parts["text/plain"]?.contains("Saturday") == false, "never an item twice")
        }
    }

    @Test("a late item moves to the next slot in the same pass that makes another member's run")
    func lateItemBesideNewRuns() async throws {
        let env = try await TestEnvironment.shared
        let (org, catalogue) = try await clubMember()
        let second = try await org.store { tx in
            let id = try await tx.createUser(NewUser(email: "second@\(org.slug).example", displayName: "Second")).id
            _ = try await tx.query("UPDATE users SET timezone = 'Europe/Paris' WHERE organisation_id = \(org.id) AND id = \(id)")
            try await tx.replacePreferences(
                ofUser: id,
                with: [
                    PreferenceCell(
                        categoryID: catalogue.activity, channel: .email, setting: PreferenceSetting(enabled: true, frequency: .daily))
                ])
            return id
        }
        _ = try await task(org, "First", to: [org.memberID])
        let slot = try #require(try await items(org, of: org.memberID).first?.slot)
        let after = slot.addingTimeInterval(60)
        func pass() async throws {
            _ = try await env.workerDatabase.claimDigestRuns(
                worker: "late-pass", limit: 1, leaseSeconds: 60, now: after, organisation: org.id)
        }
        // The slot comes: the member's run is made, and frozen.
        try await pass()
        #expect(try await items(org, of: org.memberID).first?.run != nil)
        // A late item for the member, and the second member's first item, also due. A notify now
        // sees the run and takes the next slot (`slotAlreadyMade`); a late item is one whose notify
        // read the slots before the run was made and committed after: stamped with the same slot.
        _ = try await task(org, "Late", to: [org.memberID])
        _ = try await org.store { tx in
            try await tx.query(
                "UPDATE digest_items SET slot_at = \(slot) WHERE organisation_id = \(org.id) AND user_id = \(org.memberID) AND run_id IS NULL"
            )
        }
        _ = try await task(org, "Second's", to: [second])
        #expect(try await items(org, of: org.memberID).last?.slot == slot)
        // One pass makes the second member's run and moves the late item to the next slot.
        try await pass()
        #expect(try await items(org, of: second).first?.run != nil)
        var paris = Calendar(identifier: .gregorian)
        paris.timeZone = TimeZone(identifier: "Europe/Paris")!
        let next = try #require(paris.date(byAdding: .day, value: 1, to: slot))
        let late = try #require(try await items(org, of: org.memberID).last)
        #expect(late.slot == next && late.run == nil, "the late item waits for the next slot: \(late)")
    }

    @Test("a new digest hour moves what waits: one digest that day, at the new hour, with every item (not one at each hour)")
    func newHourMovesWaitingItems() async throws {
        let (org, _) = try await clubMember()
        let address = "member@\(org.slug).example"
        _ = try await task(org, "Before the change")
        let paris = TimeZone(identifier: "Europe/Paris")!
        func hour(_ date: Date) -> Int {
            var calendar = Calendar(identifier: .gregorian)
            calendar.timeZone = paris
            return calendar.component(.hour, from: date)
        }
        #expect(try await items(org, of: org.memberID).map { hour($0.slot) } == [8])
        try await TestEnvironment.shared.application().test(.router) { client in
            let patched = try await client.send(.patch, "/v1/organisation", token: org.ownerToken, json: #"{"digest_hour": 7}"#)
            #expect(patched.status == .ok, "\(patched.text)")
        }
        _ = try await task(org, "After the change")
        let waiting = try await items(org, of: org.memberID)
        #expect(waiting.map { hour($0.slot) } == [7, 7], "both wait for 07:00 now: \(waiting)")
        // The member's own hour moves them again.
        try await TestEnvironment.shared.application().test(.router) { client in
            let patched = try await client.send(
                .patch, "/v1/users/\(org.memberID.uuidString)", token: org.ownerToken, json: #"{"digest_hour": 9}"#)
            #expect(patched.status == .ok, "\(patched.text)")
        }
        let moved = try await items(org, of: org.memberID)
        #expect(moved.map { hour($0.slot) } == [9, 9] && Set(moved.map(\.slot)).count == 1, "\(moved)")
        // One digest, with both.
        let slot = try #require(moved.first?.slot)
        let clock = Mutex(slot.addingTimeInterval(60))
        try await withDigestRunners(org.id, now: { clock.withLock { $0 } }) { () async throws -> Void in
            #expect(try await eventually(timeout: .seconds(30)) { try await sent(org, address, runs: 1) })
            let runs = try await org.store { tx in try await tx.digestRuns(of: org.memberID) }
            #expect(runs.count == 1 && runs[0].itemCount == 2, "\(runs)")
        }
    }

    @Test(
        "a new email frequency moves what waits: weekly to the weekly slot, daily back, immediate at once as one digest; an organisation default moves those who inherit it"
    )
    func newFrequencyMovesWaitingItems() async throws {
        let (org, _) = try await clubMember()
        let address = "member@\(org.slug).example"
        _ = try await task(org, "Waiting one")
        _ = try await task(org, "Waiting two")
        @Sendable func waiting() async throws -> [(frequency: String, slot: Date)] {
            try await org.store { tx in
                try await tx.query(
                    """
                    SELECT frequency, slot_at FROM digest_items
                    WHERE organisation_id = \(org.id) AND user_id = \(org.memberID) AND run_id IS NULL AND sent_at IS NULL
                    ORDER BY created_at
                    """
                ).map { try $0.decode((String, Date).self) }
            }.map { (frequency: $0.0, slot: $0.1) }
        }
        let due = try #require(try await org.store { tx in try await tx.digestDueTimes(for: [org.memberID], after: Date()) }[org.memberID])
        #expect(due.daily != due.weekly)
        #expect(try await waiting().map(\.frequency) == ["DAILY", "DAILY"])
        try await TestEnvironment.shared.application().test(.router) { client in
            func choose(_ frequency: String, token: String, path: String = "/v1/me/preferences") async throws {
                let put = try await client.send(
                    .put, path, token: token,
                    json: #"{"items": [{"category": "activity", "channel": "email", "enabled": true, "frequency": "\#(frequency)"}]}"#)
                #expect(put.status == .ok, "\(put.text)")
            }
            // Weekly: both move to the weekly slot; no daily digest has them.
            try await choose("WEEKLY", token: org.memberToken)
            #expect(try await waiting().map { "\($0.frequency) \($0.slot)" } == Array(repeating: "WEEKLY \(due.weekly)", count: 2))
            // Daily again: back to the next daily slot.
            try await choose("DAILY", token: org.memberToken)
            #expect(try await waiting().map { "\($0.frequency) \($0.slot)" } == Array(repeating: "DAILY \(due.daily)", count: 2))
            // Off: they stay, for the send to drop.
            try await choose("NONE", token: org.memberToken)
            #expect(try await waiting().map(\.slot) == [due.daily, due.daily])
            // Immediate: due now, and sent at once as one digest of both.
            try await choose("IMMEDIATE", token: org.memberToken)
            let now = try await waiting()
            #expect(now.count == 2 && now.allSatisfy { $0.slot <= Date() }, "\(now)")
            let clock = Mutex(Date().addingTimeInterval(1))
            try await withDigestRunners(org.id, now: { clock.withLock { $0 } }) { () async throws -> Void in
                #expect(try await eventually(timeout: .seconds(30)) { try await sent(org, address, runs: 1) })
                let runs = try await org.store { tx in try await tx.digestRuns(of: org.memberID) }
                #expect(runs.count == 1 && runs[0].itemCount == 2, "\(runs)")
            }
            // An organisation default moves those who inherit it: the member's own cell gone, a
            // DAILY default makes a daily item, and a WEEKLY default moves it.
            let cleared = try await client.send(.put, "/v1/me/preferences", token: org.memberToken, json: #"{"items": []}"#)
            #expect(cleared.status == .ok, "\(cleared.text)")
            try await choose("DAILY", token: org.ownerToken, path: "/v1/organisation/preference-defaults")
            _ = try await task(org, "Inherits the default")
            #expect(try await waiting().map(\.frequency) == ["DAILY"])
            try await choose("WEEKLY", token: org.ownerToken, path: "/v1/organisation/preference-defaults")
            #expect(try await waiting().map { "\($0.frequency) \($0.slot)" } == ["WEEKLY \(due.weekly)"])
        }
    }

    @Test("a member sets their own time zone and digest hour (PATCH /v1/me): the profile shows own and effective values, what waits moves")
    func ownProfile() async throws {
        let (org, _) = try await clubMember()
        _ = try await task(org, "Waiting")
        try await TestEnvironment.shared.application().test(.router) { client in
            let me = try await client.send(.get, "/v1/me", token: org.memberToken)
            let profile = try #require(me.json["profile"] as? [String: Any], "\(me.text)")
            #expect(profile["timezone"] as? String == "Europe/Paris" && profile["digest_hour"] == nil, "\(me.text)")
            let effective = profile["effective"] as? [String: Any]
            #expect(effective?["digest_hour"] as? Int == 8 && effective?["timezone"] as? String == "Europe/Paris", "\(me.text)")
            // Evenings in Kathmandu: the profile and the waiting item follow.
            let changed = try await client.send(
                .patch, "/v1/me", token: org.memberToken, json: #"{"timezone": "Asia/Kathmandu", "digest_hour": 18, "display_name": "Mem"}"#
            )
            #expect(changed.status == .ok, "\(changed.text)")
            let now = changed.json["profile"] as? [String: Any]
            #expect(
                now?["timezone"] as? String == "Asia/Kathmandu" && now?["digest_hour"] as? Int == 18
                    && now?["display_name"] as? String == "Mem")
            var calendar = Calendar(identifier: .gregorian)
            calendar.timeZone = TimeZone(identifier: "Asia/Kathmandu")!
            let slot = try #require(try await items(org, of: org.memberID).first?.slot)
            #expect(calendar.component(.hour, from: slot) == 18 && calendar.component(.minute, from: slot) == 0, "\(slot)")
            // -1 and "" give the organisation's back; effective shows it.
            let cleared = try await client.send(.patch, "/v1/me", token: org.memberToken, json: #"{"timezone": "", "digest_hour": -1}"#)
            let back = cleared.json["profile"] as? [String: Any]
            #expect(back?["timezone"] == nil && (back?["effective"] as? [String: Any])?["timezone"] as? String == "UTC", "\(cleared.text)")
            // Not the address, not attributes (an administrator's); not a bad zone; not an API key; audited.
            for body in [#"{"email": "x@y.example"}"#, #"{"attributes": {}}"#] {
                let refused = try await client.send(.patch, "/v1/me", token: org.memberToken, json: body)
                #expect(refused.isProblem(.badRequest), "\(refused.text)")
            }
            let zone = try await client.send(.patch, "/v1/me", token: org.memberToken, json: #"{"timezone": "Mars/Olympus"}"#)
            #expect(zone.isProblem(.unprocessableContent) && (zone.json["detail"] as? String ?? "").hasPrefix("timezone"), "\(zone.text)")
            // A key, even one whose role has preferences.manage, is no user: 400 saying to use a user's token.
            let apiKey = try await org.apiKey(permissions: [.preferencesManage])
            let key = try await client.send(.patch, "/v1/me", token: apiKey, json: #"{"digest_hour": 9}"#)
            #expect(key.isProblem(.badRequest) && (key.json["detail"] as? String ?? "").contains("user's access token"), "\(key.text)")
            #expect(try await client.send(.get, "/v1/me", token: apiKey).json["profile"] == nil)
            let audit = try await client.send(.get, "/v1/audit-log?action=user.update", token: org.ownerToken)
            #expect((audit.json["items"] as? [[String: Any]])?.count == 2, "\(audit.text)")
        }
    }

    @Test("a notify in flight while the digest hour changes: its items go in the new hour's slot, whichever commits first")
    func notifyInFlightDuringHourChange() async throws {
        let (org, _) = try await clubMember()
        let env = try await TestEnvironment.shared
        let paris = TimeZone(identifier: "Europe/Paris")!
        func hours() async throws -> [Int] {
            var calendar = Calendar(identifier: .gregorian)
            calendar.timeZone = paris
            return try await items(org, of: org.memberID).map { calendar.component(.hour, from: $0.slot) }
        }
        // Whether a session waits for `held`'s locks (other suites' sessions never do: they
        // lock other organisations' rows).
        @Sendable func blocked(by held: TenantTransaction) async throws -> Bool {
            let pid = try await held.query("SELECT pg_backend_pid()").first!.decode(Int32.self)
            return try await eventually(timeout: .seconds(10)) {
                try await env.database.query(
                    "SELECT count(*)::int FROM pg_stat_activity WHERE \(pid) = ANY(pg_blocking_pids(pid))"
                ).first!.decode(Int.self) == 1
            }
        }
        // The organisation's change first, not committed: the notify waits for it, then reads
        // the new hour (before, it read 08:00 and its item kept it after the re-slot had run).
        let notifying = try await org.store { (held: TenantTransaction) async throws -> Task<UUID, any Error> in
            try await held.query("UPDATE organisations SET digest_hour = 7 WHERE id = \(org.id)")
            #expect(try await held.reslotWaitingDigestItems(of: nil, now: Date()) == 0)
            let notifying = Task { try await task(org, "While the hour changes") }
            #expect(try await blocked(by: held), "the notify waits for the change")
            return notifying
        }
        _ = try await notifying.value
        #expect(try await hours() == [7])
        // The notify first, not committed: the member's change waits for it, then moves its item.
        try await env.application().test(.router) { client in
            let patching = try await org.store { (held: TenantTransaction) async throws -> Task<TestResponse, any Error> in
                _ = try await held.send(
                    EventRequest(
                        typeKey: "TASK_ASSIGNED", audience: Audience(userIDs: [org.memberID]),
                        payload: .object(["title": .string("Second")])),
                    now: Date(), fanout: FanoutSettings())
                let patching = Task {
                    try await client.send(
                        .patch, "/v1/users/\(org.memberID.uuidString)", token: org.ownerToken, json: #"{"digest_hour": 9}"#)
                }
                #expect(try await blocked(by: held), "the change waits for the notify")
                return patching
            }
            #expect(try await patching.value.status == .ok)
        }
        #expect(try await hours() == [9, 9], "both items moved to the member's new hour")
    }

    @Test("the clinic: a critical alert for a clinician on a DAILY email digest is in the bell at once and in the next morning's digest")
    func clinicDailyAlert() async throws {
        let org = try await TestOrganisation.make()
        let catalogue = try await TestCatalogue.make(in: org)
        let address = "member@\(org.slug).example"
        try await org.store { tx in
            try await tx.query("UPDATE users SET timezone = 'Europe/Paris' WHERE organisation_id = \(org.id) AND id = \(org.memberID)")
            try await tx.replacePreferences(
                ofUser: org.memberID,
                with: [
                    PreferenceCell(
                        categoryID: catalogue.alerts, channel: .email, setting: PreferenceSetting(enabled: true, frequency: .daily))
                ])
        }
        let (_, plan) = try await org.notify(
            EventRequest(
                typeKey: "ISQ_CRITICAL", audience: Audience(userIDs: [org.memberID]),
                payload: .object(["implant": .string("36"), "isq": .number(41), "threshold": .number(55)])))
        // The bell at once (a critical category always shows in-app); the email waits for the digest.
        let channels = try #require(plan.traces.first?.channels)
        #expect(channels.first { $0.decision.channel == .inApp }?.decision.reason == .inAppCreated)
        #expect(channels.first { $0.decision.channel == .email }?.decision.reason == .digestQueued)
        #expect(plan.deliveries.isEmpty && plan.digestItems.count == 1)
        #expect(try await org.notificationIDs(of: org.memberID).count == 1)
        let slot = try #require(try await items(org, of: org.memberID).first?.slot)
        var paris = Calendar(identifier: .gregorian)
        paris.timeZone = TimeZone(identifier: "Europe/Paris")!
        #expect(paris.component(.hour, from: slot) == 8 && slot > Date() && slot <= Date().addingTimeInterval(86_400))
        let clock = Mutex(slot.addingTimeInterval(60))
        try await withDigestRunners(org.id, now: { clock.withLock { $0 } }) { () async throws -> Void in
            #expect(try await eventually(timeout: .seconds(30)) { try await sent(org, address, runs: 1) })
        }
        let mail = try ParsedMail(try #require(try await Peers.mail(to: address).first?["data"] as? String))
        let text = mail.parts["text/plain"] ?? ""
        #expect(text.contains("Alerts") && text.contains("Critical ISQ 41"), "\(text)")
        // One run, sent, with the one alert.
        let explained = try await org.store { tx in try await tx.digestRuns(of: org.memberID) }
        #expect(explained.count == 1 && explained[0].status == .sent && explained[0].itemCount == 1)
    }

    @Test("a digest template per locale renders the digest of members of that locale; a broken one is refused; without one, the default")
    func digestTemplates() async throws {
        let (org, _) = try await clubMember()
        let address = "member@\(org.slug).example"
        _ = try await org.store { tx in
            try await tx.query("UPDATE users SET locale = 'fr-CA' WHERE organisation_id = \(org.id) AND id = \(org.memberID)")
        }
        let french = #"""
            {"subject": "{{{organisation.name}}} : votre résumé ({{count}})",
             "body": "Bonjour {{{recipient.display_name}}},\n{{#sections}}[{{{category}}}]\n{{#items}}* {{{title}}} {{{link}}}\n{{/items}}{{/sections}}Se désabonner : {{{links.unsubscribe}}}\n",
             "html": "<p>Bonjour {{recipient.display_name}}</p>{{#sections}}<h3>{{category}}</h3>{{#items}}<p>{{title}}</p>{{/items}}{{/sections}}"}
            """#
        try await TestEnvironment.shared.application().test(.router) { client in
            let put = try await client.send(.put, "/v1/digest-templates/fr", token: org.ownerToken, json: french)
            #expect(put.status == .ok && put.json["locale"] as? String == "fr", "\(put.text)")
            let broken = try await client.send(
                .put, "/v1/digest-templates/de", token: org.ownerToken, json: #"{"subject": "{{#sections}}", "body": "x"}"#)
            #expect(
                broken.isProblem(.unprocessableContent) && broken.text.contains("subject") && broken.text.contains("line 1"),
                "\(broken.text)")
            let listed = try await client.send(.get, "/v1/digest-templates", token: org.ownerToken)
            #expect((listed.json["items"] as? [[String: Any]])?.map { $0["locale"] as? String } == ["fr"], "\(listed.text)")
            #expect((listed.json["default"] as? [String: Any])?["subject"] as? String == DigestTemplate.builtIn.subject)
            #expect(try await client.send(.get, "/v1/digest-templates", token: org.memberToken).isProblem(.forbidden))
            // One locale, exactly: fr as stored; fr-CA (which falls back to fr when sending) is not stored.
            let one = try await client.send(.get, "/v1/digest-templates/fr", token: org.ownerToken)
            #expect(
                one.status == .ok && one.json["locale"] as? String == "fr"
                    && (one.json["html"] as? String)?.hasPrefix("<p>Bonjour") == true, "\(one.text)")
            let unstored = try await client.send(.get, "/v1/digest-templates/fr-CA", token: org.ownerToken)
            #expect(unstored.isProblem(.notFound) && (unstored.json["detail"] as? String ?? "").contains("fallback"), "\(unstored.text)")
            #expect(try await client.send(.get, "/v1/digest-templates/fr", token: org.memberToken).isProblem(.forbidden))
            #expect(
                try await client.send(.get, "/v1/digest-templates/not_a_locale", token: org.ownerToken).isProblem(.unprocessableContent))
        }
        _ = try await task(org, "Sortie au lac", url: "https://club.example/outings/9")
        let slot = try #require(try await items(org, of: org.memberID).first?.slot)
        let clock = Mutex(slot.addingTimeInterval(60))
        try await withDigestRunners(org.id, now: { clock.withLock { $0 } }) { () async throws -> Void in
            #expect(try await eventually(timeout: .seconds(30)) { try await sent(org, address, runs: 1) })
        }
        // fr-CA falls back to fr.
        let mail = try ParsedMail(try #require(try await Peers.mail(to: address).first?["data"] as? String))
        #expect(mail.headers["Subject"]?.contains(": votre résumé (1)") == true, "\(mail.headers)")
        let text = mail.parts["text/plain"] ?? ""
        #expect(
            text.hasPrefix("Bonjour Member,") && text.contains("[Activity]")
                && text.contains("* Sortie au lac http://herald.test/v1/links/"), "\(text)")
        #expect(
            text.contains("Se désabonner : http://herald.test/v1/unsubscribe/")
                && mail.parts["text/html"]?.contains("<h3>Activity</h3>") == true)

        // Deleted, the next digest is the built-in default again.
        try await TestEnvironment.shared.application().test(.router) { client in
            let deleted = try await client.send(.delete, "/v1/digest-templates/fr", token: org.ownerToken)
            let again = try await client.send(.delete, "/v1/digest-templates/fr", token: org.ownerToken)
            #expect(deleted.status == .noContent && again.isProblem(.notFound), "\(again.text)")
            #expect((again.json["detail"] as? String)?.contains("no digest template of this locale") == true, "\(again.text)")
            // A blank subject or body is refused (the contract's minLength), and nothing is stored.
            for body in [#"{"subject": "", "body": "x"}"#, #"{"subject": "s", "body": "  \n "}"#] {
                let blank = try await client.send(.put, "/v1/digest-templates/de", token: org.ownerToken, json: body)
                #expect(blank.isProblem(.unprocessableContent) && blank.text.contains("must not be blank"), "\(blank.text)")
            }
            #expect(try await org.store { tx in try await tx.digestTemplates() }.isEmpty)
        }
        // (Notified before today's slot, after its run was frozen: it goes in tomorrow's.)
        _ = try await task(org, "Second outing")
        var paris = Calendar(identifier: .gregorian)
        paris.timeZone = TimeZone(identifier: "Europe/Paris")!
        let next = try #require(paris.date(byAdding: .day, value: 1, to: slot))
        clock.withLock { $0 = next.addingTimeInterval(60) }
        try await withDigestRunners(org.id, now: { clock.withLock { $0 } }) { () async throws -> Void in
            #expect(try await eventually(timeout: .seconds(30)) { try await sent(org, address, runs: 2) })
        }
        let second = try await Peers.mail(to: address).compactMap { $0["data"] as? String }.map(ParsedMail.init)
        #expect(
            second.contains { $0.headers["Subject"]?.contains("your daily digest (1 notification)") == true }, "\(second.map(\.headers))")
    }

    @Test("a digest's items read as the bell shows them (the in-app wording), not as letters repeating the email's greeting")
    func itemsInTheBellsWords() async throws {
        let (org, catalogue) = try await clubMember()
        let address = "member@\(org.slug).example"
        try await org.store { tx in
            try await tx.putTemplate(
                typeID: catalogue.taskAssigned, channel: .email, locale: "en",
                content: TemplateContent(
                    subject: "New task: {{payload.title}}", body: "Hello {{recipient.display_name}},\n\nA task for you."))
        }
        _ = try await task(org, "Sterilise room 2")
        _ = try await task(org, "Order implants")
        let slot = try #require(try await items(org, of: org.memberID).first?.slot)
        let clock = Mutex(slot.addingTimeInterval(60))
        try await withDigestRunners(org.id, now: { clock.withLock { $0 } }) { () async throws -> Void in
            #expect(try await eventually(timeout: .seconds(30)) { try await sent(org, address, runs: 1) })
        }
        let mail = try ParsedMail(try #require(try await Peers.mail(to: address).first?["data"] as? String))
        let text = try #require(mail.parts["text/plain"])
        #expect(text.contains("Sterilise room 2") && text.contains("Assigned to Member"), "\(text)")
        // The digest greets once; its items do not.
        #expect(text.components(separatedBy: "Hello Member").count == 2 && !text.contains("A task for you"), "\(text)")
    }

    @Test("one-click unsubscribe from a digest of two categories switches off the email of both")
    func unsubscribeEveryCategory() async throws {
        let (org, catalogue) = try await clubMember()
        let address = "member@\(org.slug).example"
        try await org.store { tx in
            let outing = try await tx.createNotificationType(
                NotificationTypeFields(
                    key: "OUTING_PUBLISHED", categoryID: catalogue.outings, name: "Outing", description: "", defaultSeverity: .info,
                    defaultPriority: .normal, defaultChannels: [.inApp]))
            try await tx.putTemplate(
                typeID: outing.id, channel: .inApp, locale: "en", content: TemplateContent(subject: "{{payload.title}}", body: ""))
            try await tx.replacePreferences(
                ofUser: org.memberID,
                with: [catalogue.activity, catalogue.outings].map {
                    PreferenceCell(categoryID: $0, channel: .email, setting: PreferenceSetting(enabled: true, frequency: .daily))
                })
        }
        _ = try await task(org, "Sterilise room 2")
        try await org.notify(
            EventRequest(
                typeKey: "OUTING_PUBLISHED", audience: Audience(userIDs: [org.memberID]), payload: .object(["title": .string("Lake")])))
        let slot = try #require(try await items(org, of: org.memberID).first?.slot)
        let clock = Mutex(slot.addingTimeInterval(60))
        try await withDigestRunners(org.id, now: { clock.withLock { $0 } }) { () async throws -> Void in
            #expect(try await eventually(timeout: .seconds(30)) { try await sent(org, address, runs: 1) })
        }
        let mail = try ParsedMail(try #require(try await Peers.mail(to: address).first?["data"] as? String))
        let unsubscribe = try #require(mail.headers["List-Unsubscribe"]?.trimmingCharacters(in: CharacterSet(charactersIn: "<>")))
        let path = String(unsubscribe.dropFirst("http://herald.test".count))
        try await TestEnvironment.shared.application().test(.router) { client in
            let page = try await client.send(.get, path)
            #expect(page.status == .ok && page.text.contains("Activity, Outings"), "\(page.text)")
            var headers = HTTPFields()
            headers[.contentType] = "application/x-www-form-urlencoded"
            let off = try await client.execute(
                uri: path, method: .post, headers: headers, body: ByteBuffer(string: "List-Unsubscribe=One-Click"))
            #expect(off.status == .ok && String(buffer: off.body).contains("Activity, Outings"))
            // A second POST (a mail scanner, a second click) changes nothing and audits nothing.
            let again = try await client.execute(
                uri: path, method: .post, headers: headers, body: ByteBuffer(string: "List-Unsubscribe=One-Click"))
            #expect(again.status == .ok)
        }
        let email = try await org.store { tx in try await tx.preferences(ofUser: org.memberID) }.filter { $0.channel == .email }
        #expect(email.count == 2 && email.allSatisfy { !$0.setting.enabled }, "\(email)")
        let audited = try await org.store { tx in
            try await tx.auditEntries(action: "preference.unsubscribe", targetID: nil, limit: 10, after: nil)
        }
        #expect(audited.items.count == 2, "one entry per category switched off, none for the second POST")
        // Each as the preference API shows a cell: the category's key, not its id.
        let keys = audited.items.compactMap { entry -> String? in
            guard case .object(let after) = entry.after, case .string(let key) = after["category"], after["enabled"] == .bool(false)
            else { return nil }
            return key
        }
        #expect(Set(keys) == ["activity", "outings"], "\(audited.items.map(\.after))")
        // A category whose items the digest dropped at send time was not in the email: its link
        // does not reach it.
        let run = try #require(try await org.store { tx in try await tx.digestRuns(of: org.memberID) }.first)
        #expect(
            Set(try await org.store { tx in try await tx.digestRunCategories(run.id, userID: org.memberID) }) == [
                catalogue.activity, catalogue.outings,
            ])
        _ = try await org.store { tx in
            try await tx.query(
                """
                UPDATE digest_items SET dropped_reason = 'CONDITION_NOT_MET'
                WHERE organisation_id = \(org.id) AND run_id = \(run.id) AND category_id = \(catalogue.outings)
                """)
        }
        #expect(try await org.store { tx in try await tx.digestRunCategories(run.id, userID: org.memberID) } == [catalogue.activity])
    }

    @Test("two runners at once: every member gets exactly one digest with every item; nothing twice, nothing lost")
    func exactlyOnceAcrossRunners() async throws {
        let (org, catalogue) = try await clubMember()
        // Twelve more members with the same preference (the owner too).
        let members = try await org.store { tx in
            var ids: [UUID] = []
            for index in 0..<12 {
                let user = try await tx.createUser(
                    NewUser(email: "m\(index)@\(org.slug).example", displayName: "M\(index)", passwordHash: nil))
                try await tx.replacePreferences(
                    ofUser: user.id,
                    with: [
                        PreferenceCell(
                            categoryID: catalogue.activity, channel: .email, setting: PreferenceSetting(enabled: true, frequency: .daily))
                    ])
                ids.append(user.id)
            }
            return ids
        }
        for index in 0..<3 { _ = try await task(org, "Item \(index)", to: members) }
        let slots = Set(try await members.asyncFlatMap { try await items(org, of: $0).map(\.slot) })
        let latest = try #require(slots.max())
        let clock = Mutex(latest.addingTimeInterval(60))
        try await withDigestRunners(org.id, count: 2, now: { clock.withLock { $0 } }) { () async throws -> Void in
            #expect(
                try await eventually(timeout: .seconds(30)) {
                    try await members.asyncAllSatisfy { member in
                        try await items(org, of: member).allSatisfy(\.sent)
                    }
                })
            // Both runners kept polling: still exactly one each.
            try await Task.sleep(for: .milliseconds(500))
        }
        for (index, member) in members.enumerated() {
            let mails = try await Peers.mail(to: "m\(index)@\(org.slug).example")
            #expect(mails.count == 1, "member \(index) got \(mails.count) digests")
            let text = try ParsedMail(try #require(mails.first?["data"] as? String)).parts["text/plain"] ?? ""
            #expect((0..<3).allSatisfy { text.contains("Item \($0)") })
            #expect(try await items(org, of: member).allSatisfy { $0.sent })
        }
        let runs = try await org.store { tx in
            try await tx.query("SELECT count(*)::int, count(DISTINCT user_id)::int FROM digest_runs WHERE organisation_id = \(org.id)")
                .first!.decode((Int, Int).self)
        }
        #expect(runs.0 == 12 && runs.1 == 12, "runs: \(runs.0), users with a run: \(runs.1)")
    }

    @Test("at send time: a cancelled event's item stays out, an expired one is dropped with its reason; a digest left empty is not sent")
    func stillQualifiesAtSendTime() async throws {
        let (org, _) = try await clubMember()
        let address = "member@\(org.slug).example"
        let cancelled = try await task(org, "Cancelled outing")
        _ = try await task(org, "Expiring outing", expiresAt: Date().addingTimeInterval(30))
        _ = try await task(org, "Kept outing")
        let slot = try #require(try await items(org, of: org.memberID).first?.slot)
        try await org.store { tx in _ = try await tx.cancelEvent(cancelled, now: Date()) }
        let clock = Mutex(slot.addingTimeInterval(60))
        try await withDigestRunners(org.id, now: { clock.withLock { $0 } }) { () async throws -> Void in
            #expect(try await eventually(timeout: .seconds(30)) { try await sent(org, address, runs: 1) })
        }
        let text = try ParsedMail(try #require(try await Peers.mail(to: address).first?["data"] as? String)).parts["text/plain"] ?? ""
        #expect(text.contains("Kept outing") && !text.contains("Cancelled outing") && !text.contains("Expiring outing"))
        let states = try await items(org, of: org.memberID)
        #expect(states[0].run == nil && !states[0].sent, "the cancelled item joined no run")
        #expect(states[1].dropped == "EVENT_EXPIRED" && !states[1].sent)
        #expect(states[2].dropped == nil && states[2].sent)

        // Every item gone by the slot (the member switched email off): an EMPTY run, no email.
        // (Notified before today's slot, after its run was frozen: it goes in tomorrow's.)
        _ = try await task(org, "Tomorrow's outing")
        var paris = Calendar(identifier: .gregorian)
        paris.timeZone = TimeZone(identifier: "Europe/Paris")!
        let next = try #require(paris.date(byAdding: .day, value: 1, to: slot))
        _ = try await org.store { tx in
            try await tx.query(
                "UPDATE preferences SET enabled = false WHERE organisation_id = \(org.id) AND user_id = \(org.memberID) AND channel = 'email'"
            )
        }
        clock.withLock { $0 = next.addingTimeInterval(60) }
        try await withDigestRunners(org.id, now: { clock.withLock { $0 } }) { () async throws -> Void in
            #expect(
                try await eventually(timeout: .seconds(30)) {
                    try await org.store { tx in try await tx.digestRuns(of: org.memberID) }.first?.status == .empty
                })
        }
        #expect(try await Peers.mail(to: address).count == 1)
        #expect(try await items(org, of: org.memberID).last?.dropped == "CHANNEL_DISABLED")
    }
}

extension DigestTests {
    @Test(
        "the organisation's digest hour and weekday and a user's own, set through the API, decide the slots; explain shows the slot, the run and a drop"
    )
    func settingsAndExplain() async throws {
        let (org, _) = try await clubMember()
        let env = try await TestEnvironment.shared
        let app = try env.application()
        let member = org.memberID.uuidString.lowercased()
        try await app.test(.router) { client in
            // The organisation's digests at 18:00, weekly ones on Friday; bad values are 422s.
            let changed = try await client.send(
                .patch, "/v1/organisation", token: org.ownerToken, json: #"{"digest_hour": 18, "digest_weekday": 5}"#)
            #expect(changed.status == .ok && changed.json["digest_hour"] as? Int == 18 && changed.json["digest_weekday"] as? Int == 5)
            let bad = try await client.send(.patch, "/v1/organisation", token: org.ownerToken, json: #"{"digest_hour": 24}"#)
            #expect(bad.isProblem(.unprocessableContent), "\(bad.text)")
            // The member's own hour wins over the organisation's; -1 gives it back.
            let own = try await client.send(.patch, "/v1/users/\(member)", token: org.ownerToken, json: #"{"digest_hour": 6}"#)
            #expect(own.status == .ok && own.json["digest_hour"] as? Int == 6 && own.json["digest_weekday"] == nil, "\(own.text)")
            let event = try await task(org, "Outing at dawn", expiresAt: Date().addingTimeInterval(3 * 86400))
            let slot = try #require(try await items(org, of: org.memberID).last?.slot)
            var paris = Calendar(identifier: .gregorian)
            paris.timeZone = TimeZone(identifier: "Europe/Paris")!
            #expect(paris.component(.hour, from: slot) == 6)
            let back = try await client.send(.patch, "/v1/users/\(member)", token: org.ownerToken, json: #"{"digest_hour": -1}"#)
            #expect(back.status == .ok && back.json["digest_hour"] == nil)
            _ = try await task(org, "Outing at dusk")
            // The waiting item moved with the hour: both go at 18:00, in one digest.
            let waiting = try await items(org, of: org.memberID)
            #expect(waiting.map { paris.component(.hour, from: $0.slot) } == [18, 18], "\(waiting)")
            let dueSlot = try #require(waiting.first?.slot)
            #expect(dueSlot != slot && waiting.last?.slot == dueSlot)

            // Explain: before sending, the item, its slot and no run.
            func digestChannel() async throws -> [String: Any] {
                let explained = try await client.send(.get, "/v1/events/\(event.uuidString.lowercased())/explain", token: org.ownerToken)
                let users = explained.json["items"] as? [[String: Any]] ?? []
                let channels = users.first { $0["user_id"] as? String == member }?["channels"] as? [[String: Any]] ?? []
                return channels.first { $0["channel"] as? String == "email" } ?? [:]
            }
            let before = try await digestChannel()
            #expect(before["outcome"] as? String == "DIGEST" && before["digest_status"] as? String == "PENDING")
            #expect((before["digest_due_at"] as? String).flatMap { try? Date($0, strategy: .iso8601) } == dueSlot)
            #expect(before["digest_run"] == nil)
            // A dry run of the same event shows the same slot for the digest it would join.
            let dry = try await client.send(
                .post, "/v1/events/dry-run", token: org.ownerToken,
                json: #"{"type": "TASK_ASSIGNED", "audience": {"user_ids": ["\#(member)"]}, "payload": {"title": "Dry"}}"#)
            let dryChannels = (dry.json["items"] as? [[String: Any]])?.first?["channels"] as? [[String: Any]] ?? []
            let dryEmail = dryChannels.first { $0["channel"] as? String == "email" } ?? [:]
            #expect(dryEmail["outcome"] as? String == "DIGEST", "\(dry.text)")
            #expect((dryEmail["digest_due_at"] as? String).flatMap { try? Date($0, strategy: .iso8601) } == dueSlot, "\(dryEmail)")

            // The event expires before its slot: the run drops it and, empty, sends nothing.
            let clock = Mutex(dueSlot.addingTimeInterval(3 * 86400))
            try await withDigestRunners(org.id, now: { clock.withLock { $0 } }) { () async throws -> Void in
                // Until the run is recorded (the drop is written before the run completes).
                #expect(
                    try await eventually(timeout: .seconds(30)) {
                        let runs = try await org.store { tx in try await tx.digestRuns(of: org.memberID) }
                        return runs.contains { $0.slotAt == dueSlot && [.empty, .sent].contains($0.status) }
                    })
            }
            let after = try await digestChannel()
            #expect(
                after["digest_status"] as? String == "DROPPED" && after["digest_dropped_reason"] as? String == "EVENT_EXPIRED", "\(after)")
            let run = try #require(after["digest_run"] as? [String: Any])
            #expect(["EMPTY", "SENT"].contains(run["status"] as? String) && run["attempts"] as? Int == 1, "\(run)")
        }
    }
}

extension DigestTests {
    @Test("an item whose slot's digest was already made (digests send --at ahead of its time) goes to the next slot at once")
    func slotAlreadyMade() async throws {
        let (org, _) = try await clubMember()
        let env = try await TestEnvironment.shared
        _ = try await task(org, "Before the run")
        let first = try #require(try await items(org, of: org.memberID).first).slot
        // The run of that slot made ahead of its time, as `herald digests send --at` makes it.
        let claimed = try await env.workerDatabase.claimDigestRuns(
            worker: "ahead", limit: 10, leaseSeconds: 60, now: first.addingTimeInterval(60), organisation: org.id)
        #expect(claimed.count == 1)
        _ = try await task(org, "After the run")
        let slots = try await items(org, of: org.memberID).map(\.slot)
        var paris = Calendar(identifier: .gregorian)
        paris.timeZone = TimeZone(identifier: "Europe/Paris")!
        let next = try #require(paris.date(byAdding: .day, value: 1, to: first))
        #expect(slots == [first, next], "\(slots)")
        // A re-slot (a change of hour, weekday or zone runs one) does not move it back either.
        _ = try await org.store { tx in try await tx.reslotWaitingDigestItems(of: [org.memberID], now: Date()) }
        #expect(try await items(org, of: org.memberID).map(\.slot) == [first, next])
    }
}

extension DigestTests {
    @Test("herald digests send --dry-run lists what is due and sends nothing; herald digests send sends it, printing progress")
    func command() async throws {
        let (org, _) = try await clubMember()
        let env = try await TestEnvironment.shared
        let address = "member@\(org.slug).example"
        _ = try await task(org, "Outing by the lake")
        _ = try await task(org, "Outing in the hills")
        // Their slot has come (the command runs on the real clock).
        _ = try await org.store { tx in
            try await tx.query("UPDATE digest_items SET slot_at = now() - interval '1 minute' WHERE organisation_id = \(org.id)")
        }
        let listed = try await runHerald(["digests", "send", "--dry-run"], ["DATABASE_OWNER_URL": env.ownerURL])
        #expect(listed.contains("due: organisation \(org.id.uuidString.lowercased()) \(address) DAILY slot "), "\(listed)")
        #expect(listed.contains("\(address) DAILY slot") && listed.contains(": 2 item(s)"))
        #expect(listed.contains("nothing sent"))
        #expect(try await Peers.mail(to: address).isEmpty)
        #expect(try await org.store { tx in try await tx.digestRuns(of: org.memberID) }.isEmpty)

        // Without the servers' link keys its links would be dead: refused, nothing sent.
        let keyless = try await runHeraldExit(
            ["digests", "send"],
            ["DATABASE_WORKER_URL": env.workerURL, "HERALD_WORKER_ORGANISATION": org.id.uuidString, "HERALD_SMTP_URL": Peers.smtpURL])
        #expect(keyless.status != 0 && keyless.output.contains("HERALD_LINK_KEYS is not set"), "\(keyless.output)")
        #expect(try await Peers.mail(to: address).isEmpty)
        let sent = try await runHerald(
            ["digests", "send"],
            [
                "DATABASE_WORKER_URL": env.workerURL, "HERALD_WORKER_ORGANISATION": org.id.uuidString, "HERALD_SMTP_URL": Peers.smtpURL,
                "HERALD_LOG_LEVEL": "error", "HERALD_LINK_KEYS": TestEnvironment.linkKeysSetting,
                "HERALD_PUBLIC_URL": "https://herald.clinic.example",
            ])
        #expect(sent.contains("digests send: 1 run(s) attempted"), "\(sent)")
        // Where its links lead, said first and used in the email.
        #expect(sent.contains("links in the emails lead to https://herald.clinic.example (HERALD_PUBLIC_URL)"), "\(sent)")
        #expect(try await Peers.mail(to: address).count == 1)
        let mail = try #require(try await Peers.mail(to: address).first?["data"] as? String)
        #expect(mail.contains("List-Unsubscribe: <https://herald.clinic.example/v1/unsubscribe/"), "\(mail.prefix(2000))")
        #expect(try await org.store { tx in try await tx.digestRuns(of: org.memberID) }.map(\.status) == [.sent])
        // Nothing is due any more.
        let again = try await runHerald(
            ["digests", "send"],
            [
                "DATABASE_WORKER_URL": env.workerURL, "HERALD_WORKER_ORGANISATION": org.id.uuidString, "HERALD_SMTP_URL": Peers.smtpURL,
                "HERALD_LINK_KEYS": TestEnvironment.linkKeysSetting,
            ])
        #expect(again.contains("0 run(s) attempted"), "\(again)")
        #expect(again.contains("HERALD_PUBLIC_URL is not set"), "\(again)")
        #expect(try await Peers.mail(to: address).count == 1)

        // An item committed after its slot's run was made goes to the next slot: the list does not
        // say it is due in this one. A run whose retry has come is listed as a retry.
        let run = try #require(try await org.store { tx in try await tx.digestRuns(of: org.memberID) }.first)
        _ = try await task(org, "Late outing")
        _ = try await org.store { tx in
            try await tx.query("UPDATE digest_items SET slot_at = \(run.slotAt) WHERE organisation_id = \(org.id) AND run_id IS NULL")
        }
        _ = try await env.workerDatabase.withTenant(org.id) { tx in // runs are the worker role's to change
            try await tx.query(
                "UPDATE digest_runs SET status = 'FAILED', next_attempt_at = now() - interval '1 second' WHERE organisation_id = \(org.id)")
        }
        let late = try await runHerald(
            ["digests", "send", "--dry-run"], ["DATABASE_OWNER_URL": env.ownerURL, "HERALD_WORKER_ORGANISATION": org.id.uuidString])
        #expect(late.contains("1 digest(s) due with 2 item(s)") && late.contains("(a retry: 1 attempt(s) so far)"), "\(late)")
        #expect(!late.contains(": 1 item(s)"), "\(late)")
    }
}

extension DigestTests {
    @Test(
        "the club: new outings only, while the licence is valid, checked again when the weekly digest goes; a click counts as engagement; one-click unsubscribe"
    )
    func club() async throws {
        let org = try await TestOrganisation.make()
        let catalogue = try await TestCatalogue.make(in: org)
        var paris = Calendar(identifier: .gregorian)
        paris.timeZone = TimeZone(identifier: "Europe/Paris")!
        let parisToday = {
            let parts = paris.dateComponents([.year, .month, .day], from: Date())
            return String(format: "%04d-%02d-%02d", parts.year!, parts.month!, parts.day!)
        }()
        try await org.store { tx in
            for key in ["OUTING_PUBLISHED", "OUTING_CHANGED"] {
                let type = try await tx.createNotificationType(
                    NotificationTypeFields(
                        key: key, categoryID: catalogue.outings, name: key, description: "", defaultSeverity: .info,
                        defaultPriority: .normal,
                        defaultChannels: [.inApp]))
                try await tx.putTemplate(
                    typeID: type.id, channel: .inApp, locale: "en",
                    content: TemplateContent(subject: "{{payload.title}}", body: "{{payload.where}}"))
            }
            // The member's licence runs out today; the owner's in 2099. Both want new outings
            // (not changes) weekly, while their licence is valid.
            for (user, licence) in [(org.memberID, parisToday), (org.ownerID, "2099-12-31")] {
                try await tx.query(
                    """
                    UPDATE users SET timezone = 'Europe/Paris', attributes = jsonb_build_object('licence_valid_until', \(licence)::text)
                    WHERE organisation_id = \(org.id) AND id = \(user)
                    """)
                try await tx.replacePreferences(
                    ofUser: user,
                    with: [
                        PreferenceCell(
                            categoryID: catalogue.outings, channel: .email,
                            setting: PreferenceSetting(
                                enabled: true, frequency: .weekly,
                                conditions: [
                                    Condition(field: "event.type", op: .in, values: [.string("OUTING_PUBLISHED")]),
                                    Condition(field: "recipient.attributes.licence_valid_until", op: .atLeast, value: .string("today")),
                                ]))
                    ])
            }
        }
        let both = Audience(userIDs: [org.memberID, org.ownerID])
        try await org.notify(
            EventRequest(
                typeKey: "OUTING_PUBLISHED", audience: both,
                payload: .object(["title": .string("Hike to the lake"), "where": .string("Annecy")]),
                url: "https://club.example/outings/7"))
        let (_, changed) = try await org.notify(
            EventRequest(
                typeKey: "OUTING_CHANGED", audience: both, payload: .object(["title": .string("Hike moved"), "where": .string("Annecy")])))
        #expect(changed.digestItems.isEmpty, "changes to outings are not wanted")
        #expect(changed.traces.allSatisfy { $0.channels.first { $0.decision.channel == .email }?.decision.reason == .conditionNotMet })
        let memberItems = try await items(org, of: org.memberID)
        let ownerItems = try await items(org, of: org.ownerID)
        try #require(memberItems.count == 1 && ownerItems.count == 1, "valid today: both get the new outing in their digest")
        // The weekly slot: Monday 08:00 in Paris. The digest goes a week late (a day the member's
        // licence is no longer valid): it is checked again then.
        let slot = try #require(memberItems.first?.slot)
        #expect(paris.component(.weekday, from: slot) == 2 && paris.component(.hour, from: slot) == 8)
        let clock = Mutex(slot.addingTimeInterval(7 * 86400 + 60))
        let ownerAddress = "owner@\(org.slug).example"
        try await withDigestRunners(org.id, now: { clock.withLock { $0 } }) { () async throws -> Void in
            #expect(
                try await eventually(timeout: .seconds(30)) {
                    let member = try await items(org, of: org.memberID).first
                    let owner = try await items(org, of: org.ownerID).first
                    return member?.dropped != nil && owner?.sent == true
                })
        }
        #expect(try await items(org, of: org.memberID).first?.dropped == "CONDITION_NOT_MET", "the licence expired before the digest")
        #expect(try await Peers.mail(to: "member@\(org.slug).example").isEmpty)
        let mail = try ParsedMail(try #require(try await Peers.mail(to: ownerAddress).first?["data"] as? String))
        let text = (mail.parts["text/plain"] ?? "").replacingOccurrences(of: "\r\n", with: "\n")
        #expect(
            text.contains("your weekly digest of what is new") && text.contains("Outings\n  - Hike to the lake")
                && !text.contains("Hike moved"),
            "\(text)"
        )

        // The tracked link: a 302 to the outing, and the click counts as engagement.
        let link = try #require(
            text.split(separator: "\n").first { $0.contains("http://herald.test/v1/links/") }?.trimmingCharacters(in: .whitespaces))
        let unsubscribe = try #require(mail.headers["List-Unsubscribe"]?.trimmingCharacters(in: CharacterSet(charactersIn: "<>")))
        let env = try await TestEnvironment.shared
        // The owner last engaged a month ago.
        _ = try await org.store { tx in
            try await tx.query(
                "UPDATE users SET last_engaged_at = now() - interval '30 days' WHERE organisation_id = \(org.id) AND id = \(org.ownerID)")
        }
        let clickedAt = Date()
        try await env.application().test(.router) { client in
            let followed = try await client.send(.get, String(link.dropFirst("http://herald.test".count)))
            #expect(followed.status == .found && followed.headers[.location] == "https://club.example/outings/7")
            let engaged = try await org.store { tx in try await tx.user(org.ownerID).lastEngagedAt }
            #expect(engaged >= clickedAt.addingTimeInterval(-1), "the click refreshed the owner's engagement: \(engaged)")
            // One click (RFC 8058): the owner's outings email is off.
            var headers = HTTPFields()
            headers[.contentType] = "application/x-www-form-urlencoded"
            let off = try await client.execute(
                uri: String(unsubscribe.dropFirst("http://herald.test".count)), method: .post, headers: headers,
                body: ByteBuffer(string: "List-Unsubscribe=One-Click"))
            #expect(off.status == .ok)
        }
        let preference = try await org.store { tx in try await tx.preferences(ofUser: org.ownerID) }
            .first { $0.categoryID == catalogue.outings && $0.channel == .email }
        #expect(preference?.setting.enabled == false)
    }
}

extension Array where Element: Sendable {
    func asyncFlatMap<T>(_ transform: (Element) async throws -> [T]) async rethrows -> [T] {
        var result: [T] = []
        for element in self { result += try await transform(element) }
        return result
    }

    func asyncAllSatisfy(_ predicate: (Element) async throws -> Bool) async rethrows -> Bool {
        for element in self where !(try await predicate(element)) { return false }
        return true
    }
}
