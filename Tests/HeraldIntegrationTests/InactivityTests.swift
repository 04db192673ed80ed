import Foundation
import HTTPTypes
import HeraldAPI
import HeraldCore
import HummingbirdTesting
import NIOCore
import PostgresNIO
import Testing

@testable import HeraldDelivery
@testable import HeraldStore

/// The inactivity rule (issue 11, the club's): a warning after the organisation's period without
/// engagement, engagement by a "keep me subscribed" link, a tracked click or a feed read, and the
/// email switched off after the grace period, audited and explained. Against the real SMTP
/// server; the rule's clock is injected (nothing waits a year).
@Suite("Inactivity")
struct InactivityTests {
    /// Runs the organisation's inactivity job at `now`, as the workers do; its counts.
    func sweep(_ org: TestOrganisation, at now: Date) async throws -> [String: Int] {
        let env = try await TestEnvironment.shared
        _ = try await org.store { tx in try await tx.requestJobRun(try await tx.job(named: .inactivity).id) }
        let mailer = InactivityMailer(
            email: EmailTransport(
                settings: EmailTransport.settings(url: Peers.smtpURL, username: nil, password: nil, timeout: 10)!,
                defaultFrom: "herald@herald.test"),
            links: LinkBuilder(baseURL: "http://herald.test", keys: TestEnvironment.linkKeys))
        let runner = WorkRunner(
            configuration: WorkRunnerConfiguration(name: "inactivity-\(UUID().uuidString.prefix(6))"),
            queue: JobQueue(database: env.workerDatabase, organisation: org.id, name: .inactivity, now: { now }),
            handler: JobHandler(database: env.workerDatabase, mailer: mailer, now: { now }),
            bus: NotificationBus(client: env.workerClient, logger: env.logger), logger: env.logger)
        // The run asked for; with a clock a year ahead, the scheduled one is due as well.
        #expect(try await runner.runDue() >= 1)
        let run = try #require(try await org.store { tx in try await tx.job(named: .inactivity) }.lastRun)
        #expect(run.status == .succeeded, "\(run.error ?? "")")
        return run.counts
    }

    func user(_ org: TestOrganisation, _ id: UUID) async throws -> User {
        try await org.store { tx in try await tx.user(id) }
    }

    @Test("warned after the period, kept by engagement, switched off after the grace period: audited and explained")
    func rule() async throws {
        let org = try await TestOrganisation.make()
        let catalogue = try await TestCatalogue.make(in: org)
        let member = "member@\(org.slug).example"
        let owner = "owner@\(org.slug).example"
        // Off by default: a year later, nobody hears of it.
        let start = Date()
        #expect(try await sweep(org, at: start.addingTimeInterval(400 * 86_400)).isEmpty)
        try await org.store { tx in
            _ = try await tx.updateOrganisation(
                name: nil, defaultLocale: nil, defaultTimezone: nil, inactivity: InactivityChange(enabled: true))
            // The owner reads activity by email; outings they had switched off themselves.
            try await tx.replacePreferences(
                ofUser: org.ownerID,
                with: [
                    PreferenceCell(
                        categoryID: catalogue.activity, channel: .email, setting: PreferenceSetting(enabled: true, frequency: .immediate)),
                    PreferenceCell(
                        categoryID: catalogue.outings, channel: .email, setting: PreferenceSetting(enabled: false, frequency: .immediate)),
                ])
        }
        // 100 days on: nothing yet.
        #expect(try await sweep(org, at: start.addingTimeInterval(100 * 86_400))["warned"] == 0)
        // 366 days on: both are warned, once, with a signed "keep me subscribed" link.
        let warnedAt = start.addingTimeInterval(366 * 86_400)
        #expect(try await sweep(org, at: warnedAt)["warned"] == 2)
        #expect(try await sweep(org, at: warnedAt.addingTimeInterval(3600))["warned"] == 0)
        let mails = try await Peers.mail(to: member)
        let ownerMails = try await Peers.mail(to: owner)
        #expect(mails.count == 1 && ownerMails.count == 1)
        let mail = try ParsedMail(try #require(mails.first?["data"] as? String))
        #expect(mail.headers["Subject"]?.contains("do you still want our emails?") == true, "\(mail.headers)")
        let text = try #require(mail.parts["text/plain"])
        #expect(text.contains("for 365 days") && text.contains("In 14 days"), "\(text)")
        let found = try #require(text.range(of: "http://herald.test/v1/stay/"), "\(text)")
        let path = "/v1/stay/" + text[found.upperBound...].prefix { !$0.isWhitespace }
        #expect(try await user(org, org.memberID).inactivityWarnedAt != nil)

        // The member follows the link the next day: the page changes nothing, the button keeps them.
        let env = try await TestEnvironment.shared
        let nextDay = warnedAt.addingTimeInterval(86_400)
        try await env.application(now: { nextDay }).test(.router) { client in
            let page = try await client.send(.get, path)
            #expect(page.status == .ok && page.text.contains("Keep me subscribed"), "\(page.text)")
            #expect(try await user(org, org.memberID).inactivityWarnedAt != nil)
            let kept = try await client.send(.post, path)
            #expect(kept.status == .ok && kept.text.contains("you stay subscribed"), "\(kept.text)")
            // A forged or foreign token is the same 404.
            #expect(try await client.send(.post, path + "x").isProblem(.notFound))
        }
        let kept = try await user(org, org.memberID)
        #expect(kept.inactivityWarnedAt == nil && abs(kept.lastEngagedAt.timeIntervalSince(nextDay)) < 1)

        // 15 days after the warning: the owner, still silent, loses email to non-critical
        // categories; the member, who engaged, keeps it and is not warned again.
        let switchedAt = warnedAt.addingTimeInterval(15 * 86_400)
        let counts = try await sweep(org, at: switchedAt)
        #expect(counts["switched_off"] == 1 && counts["warned"] == 0, "\(counts)")
        let cells = try await org.store { tx in try await tx.preferences(ofUser: org.ownerID) }.filter { $0.channel == .email }
        let byCategory = Dictionary(uniqueKeysWithValues: cells.map { ($0.categoryID, $0.setting) })
        #expect(byCategory[catalogue.activity]?.enabled == false && byCategory[catalogue.activity]?.switchedOff == .inactivity)
        // Their own switch-off stays theirs; the critical category is never switched off.
        #expect(byCategory[catalogue.outings]?.switchedOff == nil && byCategory[catalogue.alerts] == nil)
        #expect(try await user(org, org.ownerID).inactivitySwitchedOffAt != nil)
        #expect(try await user(org, org.memberID).inactivitySwitchedOffAt == nil)
        let audit = try await org.store { tx in
            try await tx.auditEntries(action: "user.inactivity_switch_off", targetID: org.ownerID.lowercased, limit: 5, after: nil)
        }
        let switched: [JSONValue] = if case .array(let keys)? = audit.items.first?.after?.value(at: "categories") { keys } else { [] }
        #expect(audit.items.count == 1 && switched.contains(.string("activity")))

        // Explain: the owner's email for a task says why, in its own words.
        let (_, plan) = try await org.notify(
            EventRequest(typeKey: "TASK_ASSIGNED", audience: Audience(userIDs: [org.ownerID]), payload: .object(["title": .string("T")])))
        let email = try #require(plan.traces.first?.channels.first { $0.decision.channel == .email })
        #expect(email.decision.reason == .switchedOffInactive && email.decision.outcome == .skipped)
        // Saving preferences is the owner's own choice again: the mark goes.
        try await org.store { tx in
            try await tx.replacePreferences(
                ofUser: org.ownerID,
                with: [
                    PreferenceCell(
                        categoryID: catalogue.activity, channel: .email, setting: PreferenceSetting(enabled: false, frequency: .immediate))
                ])
        }
        let (_, again) = try await org.notify(
            EventRequest(typeKey: "TASK_ASSIGNED", audience: Audience(userIDs: [org.ownerID]), payload: .object(["title": .string("T")])))
        #expect(again.traces.first?.channels.first { $0.decision.channel == .email }?.decision.reason == .channelDisabled)
    }

    @Test("herald maintenance inactivity --at tries the rule at another instant and leaves the job's schedule as it was")
    func commandAt() async throws {
        let env = try await TestEnvironment.shared
        let org = try await TestOrganisation.make()
        _ = try await TestCatalogue.make(in: org)
        let before = try await org.store { tx in
            _ = try await tx.updateOrganisation(
                name: nil, defaultLocale: nil, defaultTimezone: nil, inactivity: InactivityChange(enabled: true))
            try await tx.ensureSystemJobs()
            return try await tx.job(named: .inactivity)
        }
        let at = Date().addingTimeInterval(366 * 86_400)
        let output = try await runHerald(
            ["maintenance", "inactivity", "--organisation", org.slug, "--at", at.formatted(.iso8601)],
            ["DATABASE_OWNER_URL": env.ownerURL, "HERALD_SMTP_URL": Peers.smtpURL, "HERALD_LINK_KEYS": TestEnvironment.linkKeysSetting])
        let after = try await org.store { tx in try await tx.job(named: .inactivity) }
        // The next scheduled run is where it was (a clock a year ahead moved it a year on).
        #expect(after.nextRunAt == before.nextRunAt)
        let runs = try await org.store { tx in try await tx.jobRuns(of: after.id, limit: 10, after: nil) }.items
        // One run, the one asked for (the scheduled run, due tomorrow, did not run at once).
        #expect(runs.map(\.trigger) == [.manual], "\(runs)")
        #expect(runs.first?.counts["warned"] == 2, "\(runs)")
        // The summary reports that run's counts.
        #expect(output.contains("organisation \(org.id.lowercased): SUCCEEDED manual"), "\(output)")
        #expect(output.contains("warned"), "\(output)")
    }

    @Test("a tracked click and a feed read are engagement, recorded at most hourly")
    func engagement() async throws {
        let org = try await TestOrganisation.make()
        _ = try await TestCatalogue.make(in: org)
        let env = try await TestEnvironment.shared
        let (_, plan) = try await org.notify(
            EventRequest(
                typeKey: "ISQ_CRITICAL", audience: Audience(userIDs: [org.memberID]), payload: .object(["isq": .number(30)]),
                url: "https://clinic.example/readings/1"))
        let delivery = try #require(plan.deliveries.first { $0.channel == .email })
        let later = Date().addingTimeInterval(30 * 86_400)
        let token = TestEnvironment.linkKeys.sign(
            LinkClaims(
                scope: .click, organisationID: org.id, userID: org.memberID, deliveryID: delivery.id,
                expiresAt: later.addingTimeInterval(86_400)))
        try await env.application(now: { later }).test(.router) { client in
            let followed = try await client.send(.get, "/v1/links/\(token)")
            #expect(followed.status == .found, "\(followed.text)")
        }
        let clicked = try await user(org, org.memberID).lastEngagedAt
        #expect(abs(clicked.timeIntervalSince(later)) < 1)
        // A feed read ten minutes later is not written again; two hours later it is.
        for (minutes, expected) in [(10.0, later), (120.0, later.addingTimeInterval(7_200))] {
            let at = later.addingTimeInterval(minutes * 60)
            let memberToken = try await env.tokens.issueAccessToken(organisationID: org.id, userID: org.memberID, now: at)
            try await env.application(now: { at }).test(.router) { client in
                let read = try await client.send(.get, "/v1/me/notifications", token: memberToken)
                #expect(read.status == .ok, "\(read.text)")
            }
            let engaged = try await user(org, org.memberID).lastEngagedAt
            #expect(abs(engaged.timeIntervalSince(expected)) < 1)
        }
    }
}
