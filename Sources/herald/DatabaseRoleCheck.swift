import Logging
import PostgresNIO
import ServiceLifecycle

/// Stops the process when its database role is not the one its command needs, once the database
/// answers (an operator's trial: `serve` connected as the schema's owner started without a word,
/// though row-level security then rests on its goodwill; a worker connected as the application
/// role logged "permission denied" for every claim, forever, while its `/healthz` said ok).
/// Until the database answers, readiness says so; the check waits and tries again.
struct DatabaseRoleCheck: Service {
    enum Needs: Sendable {
        /// `serve`: a role that owns nothing and does not bypass row-level security.
        case application
        /// `worker`: the same, and allowed to run the claim functions.
        case worker
    }

    let client: PostgresClient
    let needs: Needs
    /// The setting that chose the role (`DATABASE_URL`, `DATABASE_WORKER_URL`).
    let variable: String
    let logger: Logger

    struct WrongRole: Error, CustomStringConvertible {
        var description: String
    }

    func run() async throws {
        while !Task.isCancelled {
            let verdict: String?
            do { verdict = try await problem() } catch {
                // Not reachable yet (readiness and the pool say why): try again shortly.
                try? await Task.sleep(for: .seconds(5))
                continue
            }
            if let verdict {
                logger.critical(
                    "the database role is wrong for this command; stopping", metadata: ["variable": "\(variable)", "problem": "\(verdict)"])
                throw WrongRole(description: "\(variable) \(verdict)")
            }
            break
        }
        // Checked: nothing more to do until the process stops.
        try? await gracefulShutdown()
    }

    /// Why the role is wrong for the command, or nil. Membership counts as much as the role
    /// itself (a member of the owner's role can switch row-level security off), and the schema's
    /// owner is known before any migration has run (`public`, which the bootstrap gives to
    /// `herald_owner`).
    private func problem() async throws -> String? {
        let rows = try await client.query(
            """
            SELECT current_user::text,
                   EXISTS (SELECT 1 FROM pg_roles r WHERE (r.rolsuper OR r.rolbypassrls) AND pg_has_role(current_user, r.oid, 'MEMBER')),
                   pg_has_role(current_user, (SELECT n.nspowner FROM pg_namespace n WHERE n.nspname = 'public'), 'MEMBER')
                     OR EXISTS (SELECT 1 FROM pg_class c
                                WHERE c.relnamespace = 'public'::regnamespace AND pg_has_role(current_user, c.relowner, 'MEMBER')),
                   coalesce((SELECT pg_has_role(current_user, w.oid, 'USAGE') FROM pg_roles w WHERE w.rolname = 'herald_worker'), false)
            """, logger: logger)
        var user = "", bypasses = false, owns = false, worker = false
        for try await (u, b, o, w) in rows.decode((String, Bool, Bool, Bool).self) { (user, bypasses, owns, worker) = (u, b, o, w) }
        let expected = needs == .worker ? "herald_worker" : "herald_app"
        if bypasses {
            return
                "connects as \(user), which is or belongs to a superuser or a role that bypasses row-level security: every organisation's rows are open to it. Connect as \(expected)."
        }
        if owns {
            return
                "connects as \(user), which owns the schema or belongs to its owner (the migrations' role): it can switch row-level security off. Connect as \(expected)."
        }
        if needs == .worker, !worker {
            return
                "connects as \(user), which is not herald_worker and does not belong to it: it may not claim work (claim_deliveries, claim_digest_runs, claim_jobs), so every claim would fail. Connect as herald_worker."
        }
        return nil
    }
}
