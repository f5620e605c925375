//! A real package from the index this host's pip is configured for, in a session: installed on
//! the host once (then served from the shared cache), imported across executions in a VM that
//! has no network device.

use exec_sandbox::{
    ExecOptions, Language, PackageSource, Scheduler, SchedulerConfig, SessionOptions,
};

use crate::support::chain;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_imports_pandas_across_executions() {
    let s = Scheduler::new(SchedulerConfig::from_env().unwrap()).unwrap();
    let session = s
        .session(SessionOptions::new(Language::Python).packages(["pandas==2.2.3"]))
        .await
        .unwrap_or_else(|e| panic!("session: {}", chain(&e)));
    let first = session
        .exec(ExecOptions::new(
            "import os, pandas as pd\nframe = pd.DataFrame({'a': [1, 2, 3]})\nprint(sorted(os.listdir('/sys/class/net')))",
        ))
        .await
        .unwrap();
    assert_eq!(first.stdout, "['lo']\n", "{}", first.stderr);
    assert_ne!(first.packages_source, PackageSource::None);
    let second = session
        .exec(ExecOptions::new("print(frame.a.sum(), pd.__version__)"))
        .await
        .unwrap();
    assert_eq!(second.stdout, "6 2.2.3\n", "{}", second.stderr);
    session.close().await;
}
