import Foundation
import HeraldCore
import HeraldStore
import Logging

// The inactivity rule's sweep (issue 11), run by the `inactivity` job: a warning email with a
// signed "keep me subscribed" link to each user who has not engaged for the organisation's
// period, then, after the grace period without engagement, their email to non-critical
// categories switched off (audited; explain says SWITCHED_OFF_INACTIVE).

/// What the sweep sends its warnings with.
public struct InactivityMailer: Sendable {
    let email: EmailTransport
    let links: LinkBuilder

    public init(email: EmailTransport, links: LinkBuilder) {
        self.email = email
        self.links = links
    }

    /// The warning to `user` of `organisation`, with its keep link.
    func warning(_ user: InactivityCandidate, organisation: Organisation, now: Date) throws -> [UInt8] {
        let rule = organisation.inactivity
        let keep = links.keep(organisation: organisation.id, user: user.userID, now: now, graceDays: rule.graceDays)
        let name = organisation.name
        let subject = "\(name): do you still want our emails?"
        let text = """
            Hello \(user.displayName),

            You have not opened anything from \(name) for \(rule.days) days. In \(rule.graceDays) days we will stop \
            sending you email notifications (critical alerts excepted), unless you tell us to keep them:

            Keep me subscribed: \(keep)

            Opening a notification or signing in counts too.
            """
        let html = """
            <p>Hello \(htmlEscaped(user.displayName)),</p>
            <p>You have not opened anything from \(htmlEscaped(name)) for \(rule.days) days. In \(rule.graceDays) days we will stop \
            sending you email notifications (critical alerts excepted), unless you tell us to keep them.</p>
            <p><a href="\(htmlEscaped(keep))">Keep me subscribed</a></p>
            <p>Opening a notification or signing in counts too.</p>
            """
        let from = organisation.emailFrom ?? email.defaultFrom
        let domain = from.split(separator: "@").last.map(String.init) ?? "herald"
        return try MIMEMessage(
            from: .init(from, name: organisation.emailFromName ?? name), replyTo: organisation.emailReplyTo.map { .init($0) },
            to: .init(user.email, name: user.displayName), subject: subject, textBody: text, htmlBody: html,
            // Dated by the wall clock, not by `--at`'s instant (see DigestWork).
            messageID: "inactivity-\(user.userID.lowercased)-\(Int(now.timeIntervalSince1970))@\(domain)", date: Date(), extraHeaders: []
        ).encoded()
    }
}

extension LinkBuilder {
    /// The "keep me subscribed" link of an inactivity warning: valid through the grace period and a month more.
    func keep(organisation: UUID, user: UUID, now: Date, graceDays: Int) -> String {
        let claims = LinkClaims(
            scope: .keep, organisationID: organisation, userID: user,
            expiresAt: now.addingTimeInterval(TimeInterval(graceDays + 30) * 86_400))
        return "\(baseURL)/v1/stay/\(keys.sign(claims))"
    }
}

extension Database {
    /// Runs the inactivity rule of `organisation` at `now`: warnings first (each marked once the
    /// SMTP server accepted it), then switch-offs. Counts: `warned`, `warnings_failed`,
    /// `switched_off`, `categories_switched_off`; nothing when the rule is off.
    public func applyInactivity(organisation: UUID, now: Date, mailer: InactivityMailer?, logger: Logger) async throws -> [String: Int] {
        let org = try await withTenant(organisation) { tx in try await tx.organisation() }
        guard org.inactivity.enabled else { return [:] }
        guard let mailer else { throw InactivityMailerMissing() }
        var counts = ["warned": 0, "warnings_failed": 0, "switched_off": 0, "categories_switched_off": 0]
        var after: PageCursor?
        while true {
            let page = try await withTenant(organisation) { tx in
                try await tx.usersToWarn(org.inactivity, now: now, after: after, limit: 200)
            }
            guard let last = page.last else { break }
            after = PageCursor(time: last.lastEngagedAt, id: last.userID)
            for user in page {
                let message = try mailer.warning(user, organisation: org, now: now)
                let from = org.emailFrom ?? mailer.email.defaultFrom
                switch await mailer.email.send(from: from, to: user.email, message: message) {
                case .accepted:
                    let marked = try await withTenant(organisation) { tx in
                        try await tx.markWarned(user.userID, rule: org.inactivity, now: now)
                    }
                    if marked { counts["warned", default: 0] += 1 }
                case let refused:
                    counts["warnings_failed", default: 0] += 1
                    logger.warning(
                        "inactivity warning not sent", metadata: ["user_id": .string(user.userID.lowercased), "outcome": "\(refused)"])
                }
            }
        }
        while true {
            let page = try await withTenant(organisation) { tx in try await tx.usersToSwitchOff(org.inactivity, now: now, limit: 200) }
            if page.isEmpty { break }
            for user in page {
                let keys = try await withTenant(organisation) { tx in try await tx.switchOffEmail(of: user.userID, now: now) }
                counts["switched_off", default: 0] += 1
                counts["categories_switched_off", default: 0] += keys.count
            }
        }
        return counts
    }
}

/// The rule is on but this process has no SMTP server to warn with.
struct InactivityMailerMissing: Error, CustomStringConvertible {
    var description: String { "the inactivity rule is on but this process has no SMTP settings to send its warnings with" }
}
