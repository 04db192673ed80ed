import Foundation
import HTTPTypes
import HeraldCore
import HummingbirdTesting
import PostgresNIO
import Synchronization
import Testing

@testable import HeraldAPI
@testable import HeraldStore

extension TestOrganisation {
    /// A digest run of `user` for `slot`, made by the claim as the workers make one, from one
    /// TASK_ASSIGNED email item (the organisation has `TestCatalogue`), and ended by `result` as
    /// a worker records an attempt. Nothing is sent: no runner runs.
    func digestRun(of user: UUID, slot: Date, ending result: AttemptResult) async throws -> UUID {
        let env = try await TestEnvironment.shared
        let event = try await notify(
            EventRequest(typeKey: "TASK_ASSIGNED", audience: Audience(userIDs: [user]), payload: .object(["title": .string("Fixture")]))
        ).event.id
        try await store { tx in
            try await tx.query(
                """
                INSERT INTO digest_items (organisation_id, id, event_id, user_id, category_id, channel, frequency, due_after, slot_at)
                SELECT e.organisation_id, gen_random_uuid(), e.id, \(user), t.category_id, 'email', 'DAILY', \(slot), \(slot)
                FROM events e JOIN notification_types t ON t.organisation_id = e.organisation_id AND t.id = e.type_id
                WHERE e.organisation_id = \(id) AND e.id = \(event)
                """)
        }
        let worker = "fixture-\(UUID().uuidString.prefix(6))"
        let claims = try await env.workerDatabase.claimDigestRuns(
            worker: worker, limit: 10, leaseSeconds: 60, now: slot.addingTimeInterval(1), organisation: id)
        let claim = try #require(claims.count == 1 ? claims.first : nil, "\(claims)")
        let recorded = try await env.workerDatabase.withTenant(id) { tx in
            try await tx.completeDigestRun(claim, worker: worker, result: result)
        }
        try #require(recorded)
        return claim.runID
    }
}

/// A whole second (the database keeps microseconds; a cursor and a comparison then agree).
private func wholeSecond(_ date: Date) -> Date { Date(timeIntervalSince1970: date.timeIntervalSince1970.rounded(.down)) }

private let refused = "The mail server refused the recipient address (550 5.1.1 mailbox unavailable)."

@Suite("Digest runs through the API")
struct DigestRunAPITests {
    @Test(
        "a user's digest runs come newest slot first, paged, with what waits for their next digests by frequency and slot; another organisation's user is a 404"
    )
    func listsRunsAndWaiting() async throws {
        try await withCatalogue { org, catalogue, client in
            // setup: three runs on three past days (SENT, DEAD, SENT), then two items waiting for
            // the daily digest and one for the weekly.
            let today = wholeSecond(Date())
            let slots = (1...3).map { today.addingTimeInterval(-86_400 * Double($0)) }
            let newest = try await org.digestRun(of: org.memberID, slot: slots[0], ending: .sent(responseCode: 250))
            let dead = try await org.digestRun(of: org.memberID, slot: slots[1], ending: .dead(responseCode: 550, error: refused))
            let oldest = try await org.digestRun(of: org.memberID, slot: slots[2], ending: .sent(responseCode: 250))
            try await org.store { tx in
                let outing = try await tx.createNotificationType(
                    NotificationTypeFields(
                        key: "OUTING_PLANNED", categoryID: catalogue.outings, name: "Outing planned", description: "",
                        defaultSeverity: .info, defaultPriority: .normal, defaultChannels: [.inApp]))
                try await tx.putTemplate(
                    typeID: outing.id, channel: .inApp, locale: "en", content: TemplateContent(subject: "{{payload.title}}", body: "b"))
                try await tx.replacePreferences(
                    ofUser: org.memberID,
                    with: [
                        PreferenceCell(
                            categoryID: catalogue.activity, channel: .email, setting: PreferenceSetting(enabled: true, frequency: .daily)),
                        PreferenceCell(
                            categoryID: catalogue.outings, channel: .email, setting: PreferenceSetting(enabled: true, frequency: .weekly)),
                    ])
            }
            try await org.assignTask(to: [org.memberID], title: "Ward round")
            try await org.assignTask(to: [org.memberID], title: "Handover")
            try await org.notify(
                EventRequest(
                    typeKey: "OUTING_PLANNED", audience: Audience(userIDs: [org.memberID]), payload: .object(["title": .string("Lake")])))
            let slotOf = try await org.store { tx in
                try await tx.query(
                    """
                    SELECT DISTINCT frequency, slot_at FROM digest_items
                    WHERE organisation_id = \(org.id) AND user_id = \(org.memberID) AND run_id IS NULL
                    """
                ).map { try $0.decode((String, Date).self) }
            }
            let daily = try #require(slotOf.first { $0.0 == "DAILY" }?.1)
            let weekly = try #require(slotOf.first { $0.0 == "WEEKLY" }?.1)
            try #require(slotOf.count == 2)
            let path = "/v1/users/\(org.memberID.lowercased)/digests"

            // act
            let first = try await client.send(.get, "\(path)?limit=2", token: org.ownerToken)
            let firstPage = try first.decoded(Components.Schemas.UserDigests.self)
            let cursor = try #require(firstPage.nextCursor)
            let second = try await client.send(.get, "\(path)?limit=2&cursor=\(cursor)", token: org.ownerToken)
            let secondPage = try second.decoded(Components.Schemas.UserDigests.self)

            // check
            #expect(first.status == .ok && second.status == .ok)
            #expect(firstPage.items.map(\.id) == [newest, dead].map(\.lowercased))
            #expect(secondPage.items.map(\.id) == [oldest.lowercased] && secondPage.nextCursor == nil)
            let deadRun = try #require(firstPage.items.last)
            #expect(deadRun.status == .dead && deadRun.lastError == refused && deadRun.sentAt == nil)
            #expect(deadRun.frequency == .daily && deadRun.slotAt == slots[1] && deadRun.itemCount == 1)
            #expect(deadRun.attempts == 1 && deadRun.maxAttempts == 8 && deadRun.userId == org.memberID.lowercased)
            #expect(firstPage.items[0].status == .sent && firstPage.items[0].sentAt != nil)
            let waiting = [
                Components.Schemas.WaitingDigest(frequency: .daily, slotAt: daily, items: 2),
                Components.Schemas.WaitingDigest(frequency: .weekly, slotAt: weekly, items: 1),
            ].sorted { $0.slotAt < $1.slotAt }
            #expect(firstPage.waiting == waiting && secondPage.waiting == waiting, "\(firstPage.waiting)")

            // A user with nothing: no runs, nothing waiting.
            let owner = try await client.send(.get, "/v1/users/\(org.ownerID.lowercased)/digests", token: org.ownerToken)
            #expect(owner.status == .ok)
            let ownerPage = try owner.decoded(Components.Schemas.UserDigests.self)
            #expect(ownerPage.items.isEmpty && ownerPage.waiting.isEmpty && ownerPage.nextCursor == nil)

            // Another organisation's user answers like a missing one; a member may not look.
            let other = try await TestOrganisation.make()
            let foreign = try await client.send(.get, "/v1/users/\(other.memberID.lowercased)/digests", token: org.ownerToken)
            let missing = try await client.send(.get, "/v1/users/\(UUID().uuidString.lowercased())/digests", token: org.ownerToken)
            #expect(foreign.isProblem(.notFound) && missing.isProblem(.notFound))
            #expect(foreign.text == missing.text)
            let member = try await client.send(.get, path, token: org.memberToken)
            #expect(member.isProblem(.forbidden) && member.text.contains("deliveries.read"))
        }
    }

    @Test(
        "a DEAD digest run is put back in the queue now with one more attempt, audited; a run in another state is a 409; a member may not"
    )
    func retryPutsARunBack() async throws {
        try await withCatalogue { org, _, client in
            // setup: a run that used its only attempt, and one that was sent.
            let slot = wholeSecond(Date()).addingTimeInterval(-3_600)
            let dead = try await org.digestRun(of: org.memberID, slot: slot, ending: .dead(responseCode: 550, error: refused))
            let sent = try await org.digestRun(of: org.memberID, slot: slot.addingTimeInterval(-86_400), ending: .sent(responseCode: 250))
            let env = try await TestEnvironment.shared
            _ = try await env.workerDatabase.withTenant(org.id) { tx in // runs are the worker role's to make
                try await tx.query("UPDATE digest_runs SET max_attempts = 1 WHERE organisation_id = \(org.id) AND id = \(dead)")
            }
            let path = "/v1/digest-runs/\(dead.lowercased)/retry"

            // act
            let forbidden = try await client.send(.post, path, token: org.memberToken)
            let before = Date()
            let retried = try await client.send(.post, path, token: org.ownerToken)
            let again = try await client.send(.post, path, token: org.ownerToken)
            let sentAgain = try await client.send(.post, "/v1/digest-runs/\(sent.lowercased)/retry", token: org.ownerToken)

            // check
            #expect(forbidden.isProblem(.forbidden) && forbidden.text.contains("deliveries.retry"))
            #expect(retried.status == .ok, "\(retried.text)")
            let run = try retried.decoded(Components.Schemas.DigestRun.self)
            #expect(run.id == dead.lowercased && run.status == .pending && run.attempts == 1 && run.maxAttempts == 2)
            #expect(run.lastError == nil && run.nextAttemptAt >= wholeSecond(before) && run.nextAttemptAt <= Date().addingTimeInterval(1))
            let items = try await org.store { tx in
                try await tx.query(
                    "SELECT run_id, sent_at IS NULL, dropped_reason IS NULL FROM digest_items WHERE organisation_id = \(org.id) AND run_id = \(dead)"
                ).map { try $0.decode((UUID?, Bool, Bool).self) }
            }
            #expect(items.count == 1 && items.allSatisfy { $0.1 && $0.2 }, "the item stays with its run, unsent")
            #expect(again.isProblem(.conflict) && (again.json["detail"] as? String)?.contains("this one is PENDING") == true)
            #expect(
                sentAgain.isProblem(.conflict)
                    && sentAgain.json["detail"] as? String == "Only a DEAD or FAILED digest run can be retried; this one is SENT.")
            let audited = try await org.store { tx in
                try await tx.auditEntries(action: "digest_run.retry", targetID: dead.lowercased, limit: 10, after: nil).items
            }
            try #require(audited.count == 1, "one entry: the refused retries left none")
            #expect(audited[0].actorType == .user && audited[0].actorID == org.ownerID && audited[0].targetType == "digest_run")
            #expect(
                audited[0].before == .object(["status": .string("DEAD")]) && audited[0].after == .object(["status": .string("PENDING")]))

            // Another organisation's run answers like a missing one.
            let other = try await TestOrganisation.make()
            _ = try await TestCatalogue.make(in: other)
            let theirs = try await other.digestRun(of: other.memberID, slot: slot, ending: .dead(responseCode: 550, error: refused))
            let foreign = try await client.send(.post, "/v1/digest-runs/\(theirs.lowercased)/retry", token: org.ownerToken)
            let missing = try await client.send(.post, "/v1/digest-runs/\(UUID().uuidString.lowercased())/retry", token: org.ownerToken)
            #expect(foreign.isProblem(.notFound) && foreign.text == missing.text)
            #expect(try await other.store { tx in try await tx.digestRun(theirs) }.status == .dead)
        }
    }
}

extension DigestTests {
    @Test(
        "a digest the mail server refuses goes DEAD keeping its items; retried after the address is fixed, it is sent once, with every item"
    )
    func deadDigestRetried() async throws {
        // setup: the member's address is one the SMTP peer refuses (`fail-…`).
        let (org, _) = try await clubMember()
        let refusedAddress = "fail-ann@\(org.slug).example"
        let fixedAddress = "ann@\(org.slug).example"
        try await org.store { tx in
            try await tx.query("UPDATE users SET email = \(refusedAddress) WHERE organisation_id = \(org.id) AND id = \(org.memberID)")
        }
        _ = try await task(org, "Outing on Saturday")
        _ = try await task(org, "Outing on Sunday")
        let slot = try #require(try await items(org, of: org.memberID).first?.slot)
        let clock = Mutex(slot.addingTimeInterval(60))
        try await withDigestRunners(org.id, now: { clock.withLock { $0 } }) { () async throws -> Void in
            // The slot has come: the server refuses the recipient for good, and the run is DEAD.
            #expect(
                try await eventually(timeout: .seconds(30)) {
                    try await org.store { tx in try await tx.digestRuns(of: org.memberID) }.first?.status == .dead
                })
            let dead = try #require(try await org.store { tx in try await tx.digestRuns(of: org.memberID) }.first)
            #expect(dead.attempts == 1 && dead.lastError == refused && dead.itemCount == 2)
            #expect(try await items(org, of: org.memberID).allSatisfy { $0.run == dead.id && !$0.sent && $0.dropped == nil })
            #expect(try await Peers.mail(to: refusedAddress).isEmpty)

            // act: support fixes the address and retries the run.
            try await TestEnvironment.shared.application().test(.router) { client in
                let fixed = try await client.send(
                    .patch, "/v1/users/\(org.memberID.lowercased)", token: org.ownerToken, json: #"{"email": "\#(fixedAddress)"}"#)
                #expect(fixed.status == .ok, "\(fixed.text)")
                let retried = try await client.send(.post, "/v1/digest-runs/\(dead.id.lowercased)/retry", token: org.ownerToken)
                #expect(retried.status == .ok, "\(retried.text)")
            }

            // check: one email with both items, the run SENT on its second attempt, the items sent.
            #expect(try await eventually(timeout: .seconds(30)) { try await sent(org, fixedAddress, runs: 1) })
            try await Task.sleep(for: .seconds(1)) // several polls: nothing goes twice
            let mails = try await Peers.mail(to: fixedAddress)
            try #require(mails.count == 1)
            let runs = try await org.store { tx in try await tx.digestRuns(of: org.memberID) }
            #expect(runs.map(\.id) == [dead.id] && runs[0].status == .sent && runs[0].attempts == 2 && runs[0].sentAt != nil)
            #expect(try await items(org, of: org.memberID).allSatisfy { $0.run == dead.id && $0.sent && $0.dropped == nil })
            let mail = try ParsedMail(try #require(mails[0]["data"] as? String))
            #expect(mail.headers["Message-ID"]?.contains("digest-\(dead.id.lowercased)@") == true)
            #expect(mail.headers["Subject"]?.contains("(2 notifications)") == true, "\(mail.headers)")
        }
    }
}
